"""Can a decode step be an ahead-of-time compiled package that loads in seconds? (issue 17's
start lever, asked on CPU)

A compiled runner's warm start spends its warm-up in Dynamo re-tracing frames whose code is
cached (LOG runs 42, 82). AOTInductor compiles an exported graph into a package that loads
without Dynamo or Inductor's compile. This exports one decode step (batch 1, one token,
``kv_len`` fixed) of a checkpoint's decoder with ``torch.export``, compiles it with
``aoti_compile_and_package``, then in a fresh process: loads it, gives it the model's own
weights and KV cache tensors as user-managed constants (so a runner would keep owning its
cache), runs the step, and checks which cache position it wrote and its logits against the
eager model and against ``torch.compile`` of the same step. Then one package exported with
the batch (1-4) and the attended length (2-63, as a tensor's length) dynamic, run at four
(batch, length) pairs against the eager model. Prints and writes JSON.

    .venv/bin/python perf/aoti_step_cpu.py MODEL_FOLDER --out perf/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KV_LEN, POSITION = 64, 3


def decoder(folder: str):
    import torch

    from fermi.loading import load_folder

    model = load_folder(Path(folder), torch.device("cpu"), torch.float32).model
    model.setup_cache(max_batch=1, max_seq_len=KV_LEN)
    return model.eval()


def step_args():
    import torch

    return torch.tensor([[5]]), torch.tensor([[POSITION]]), torch.tensor([0])


def build(folder: str, package: str) -> dict:
    import torch

    model = decoder(folder)

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, tokens, positions, slots):
            return self.m(tokens, positions, slots, KV_LEN, rows_are_slots=True)

    started = time.perf_counter()
    exported = torch.export.export(Step(), step_args())
    exported_at = time.perf_counter()
    torch._inductor.aoti_compile_and_package(exported, package_path=package)
    return {
        "export_s": exported_at - started,
        "aoti_compile_s": time.perf_counter() - exported_at,
        "package_mb": os.path.getsize(package) / 1e6,
    }


def load(folder: str, package: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import torch._inductor

    imported = time.perf_counter()
    step = torch._inductor.aoti_load_package(package)
    loaded = time.perf_counter()
    model = decoder(folder)
    state = {f"m.{k}": v for k, v in model.state_dict().items()}
    state |= {f"m.{k}": v for k, v in model.named_buffers()}
    names = step.get_constant_fqns()
    step.load_constants({n: state[n] for n in names}, check_full_update=True, user_managed=True)
    cache = state["m.model.layers.0.self_attn.cache.k"]
    before = cache.clone()
    called = time.perf_counter()
    out = step(*step_args())
    done = time.perf_counter()
    written = sorted({int(i[2]) for i in (cache != before).nonzero()})
    with torch.inference_mode():
        model.setup_cache(max_batch=1, max_seq_len=KV_LEN)
        eager = model(*step_args(), KV_LEN, rows_are_slots=True)
        model.setup_cache(max_batch=1, max_seq_len=KV_LEN)
        compiled = torch.compile(
            lambda t, p, s: model(t, p, s, KV_LEN, rows_are_slots=True), fullgraph=True
        )(*step_args())
    return {
        "import_torch_s": imported - t0,
        "load_package_s": loaded - imported,  # torch._inductor's import included
        "first_call_s": done - called,
        "constants": len(names),
        "cache_positions_written": written,
        "max_abs_vs_eager": float((out - eager).abs().max()),
        "max_abs_vs_torch_compile": float((out - compiled).abs().max()),
        "equal_to_torch_compile": bool(torch.equal(out, compiled)),
    }


def dynamic(folder: str, package: str) -> dict:
    """One package for every batch of 1-4 and attended length of 2-63 (the cache holds 64:
    a length equal to it takes another branch, which export refuses to make dynamic)."""
    import torch
    from torch.export import Dim

    model = decoder(folder)
    model.setup_cache(max_batch=4, max_seq_len=KV_LEN)

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, tokens, positions, slots, kv):  # kv_len as a tensor's length
            return self.m(tokens, positions, slots, kv.shape[0], rows_are_slots=True)

    batch, length = Dim("batch", min=1, max=4), Dim("kv", min=2, max=KV_LEN - 1)
    example = (torch.tensor([[5], [6]]), torch.tensor([[3], [7]]), torch.arange(2), torch.empty(32))
    started = time.perf_counter()
    exported = torch.export.export(
        Step(), example, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: length})
    )
    torch._inductor.aoti_compile_and_package(exported, package_path=package)
    built = time.perf_counter() - started
    step = torch._inductor.aoti_load_package(package)
    errors = {}
    for b, kv in ((1, 16), (2, 32), (4, KV_LEN - 1), (3, 48)):
        args = (torch.arange(b)[:, None] + 5, torch.full((b, 1), POSITION), torch.arange(b))
        model.setup_cache(max_batch=4, max_seq_len=KV_LEN)
        with torch.inference_mode():
            want = model(*args, kv, rows_are_slots=True)
        model.setup_cache(max_batch=4, max_seq_len=KV_LEN)
        errors[f"batch {b}, kv_len {kv}"] = float((step(*args, torch.empty(kv)) - want).abs().max())
    return {"export_and_compile_s": built, "max_abs_vs_eager": errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model")
    p.add_argument("--child", choices=["build", "load", "dynamic"], help=argparse.SUPPRESS)
    p.add_argument("--package")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        fn = {"build": build, "load": load, "dynamic": dynamic}[args.child]
        print(json.dumps(fn(args.model, args.package)))
        return
    package = str(Path(tempfile.mkdtemp(prefix="fermi-aoti-")) / "step.pt2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result: dict = {"command": " ".join(sys.argv), "load_average": os.getloadavg()}
    for part in ("build", "load", "load", "dynamic"):
        where = package if part != "dynamic" else package.replace("step.pt2", "dynamic.pt2")
        proc = subprocess.run(
            [sys.executable, __file__, args.model, "--child", part, "--package", where],
            capture_output=True, text=True, env=env, timeout=1800,
        )  # fmt: skip
        if proc.returncode:
            result.setdefault(part, []).append({"error": proc.stderr.strip().splitlines()[-1]})
            break
        result.setdefault(part, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(part, json.dumps(result[part][-1]), flush=True)
    import torch

    result["torch"] = torch.__version__
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
