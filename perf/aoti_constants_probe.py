"""Does a CUDA AOTInductor package built without its constants (code only) load on this
torch? A two-layer linear model, built with ``package_constants_in_so`` True and False, each
loaded in a fresh process (a crash there is a segfault, so a child process), the code-only
one given the model's own tensors as user-managed constants. Prints one line per variant.

    python3 perf/aoti_constants_probe.py
"""

import subprocess
import sys

import torch

if len(sys.argv) > 2:  # child: load sys.argv[2] (in_so = sys.argv[1])
    in_so = sys.argv[1] == "1"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
    step = torch._inductor.aoti_load_package(sys.argv[2])
    if not in_so:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        step.load_constants(state, check_full_update=True, user_managed=True)
    x = torch.randn(4, 64, device="cuda")
    print("max abs vs eager", float((step(x) - model(x)).abs().max()))
    sys.exit(0)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
exported = torch.export.export(model, (torch.randn(4, 64, device="cuda"),))
for in_so in (True, False):
    path = f"/tmp/probe_{int(in_so)}.pt2"
    torch._inductor.aoti_compile_and_package(
        exported,
        package_path=path,
        inductor_configs={"aot_inductor.package_constants_in_so": in_so},
    )
    child = subprocess.run(
        [sys.executable, __file__, str(int(in_so)), path], capture_output=True, text=True
    )
    tail = (child.stdout + child.stderr).strip().splitlines()[-1:]
    print(f"package_constants_in_so={in_so}: exit {child.returncode}", tail, flush=True)
