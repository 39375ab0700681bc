"""Does a decode step as an AOTInductor package carry the GPU runner's own kernels, capture
into a CUDA graph, and load in seconds? (issue 17's start lever; LOG run 83 asked it on CPU)

The compiled runner's warm start is Dynamo re-tracing frames whose code is cached (LOG runs
42, 82). An AOTInductor package loads without Dynamo. This exports the one-row decode step
of a random-weight model at real shapes with the runner's GPU set-up (the fused row
products and the split-KV decode attention: Triton ``triton_op``s, no PDL), the attended
length dynamic, and compiles it into a package. Then, in a fresh process: import torch,
load the package (timed), hand it the model's own weights and KV cache as user-managed
constants, run it, capture it into a CUDA graph, and compare its logits and its replay
time with the compiled runner's (``CudaGraphRunner``, built after the package's figures
are taken) on the same weights, cache and inputs. Prints and writes JSON.

    PYTHONPATH=$PWD python3 perf/aoti_step_gpu.py --model Qwen3-1.7B --out x.json
    .venv/bin/python perf/aoti_step_gpu.py --device cpu --layers 2 --model Qwen3-0.6B  # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_SEQ_LEN = 4096
POSITION, KV = 130, 256  # the step's position and attended length (the runner's first bucket)


def model_at(name: str, device: str, layers: int | None):
    """Fermi's decoder with seeded random weights (the same in every process), its cache
    set up as a one-row runner's, and the runner's one-row kernels chosen."""
    import torch

    from fermi.models.decoder import Decoder
    from fermi.models.registry import adapter_for
    from fermi.models.shapes import config
    from fermi.runners.torch_cuda import cache_positions

    cfg = dict(config(name))
    if layers:
        cfg["num_hidden_layers"] = layers
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(adapter_for(cfg).to_config(cfg)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model = model.eval().requires_grad_(False)
    model.setup_cache(1, cache_positions(MAX_SEQ_LEN))
    gpu = device == "cuda"
    model.row_kernels = gpu and model.use_row_kernels()
    for layer in model.model.layers:
        layer.row_kernels = model.row_kernels
        layer.self_attn.decode_kernel = "split" if gpu else "sdpa"
    return model


def step_inputs(device: str, kv: int = KV):
    import torch

    long = {"dtype": torch.long, "device": device}
    tokens, positions = torch.tensor([[5]], **long), torch.tensor([[POSITION]], **long)
    return tokens, positions, torch.zeros(1, **long), torch.empty(kv, device=device)


class _Step:
    """The exported callable: the model's forward at one row, the attended length given as
    a tensor's length (export makes it a dynamic dimension)."""

    @staticmethod
    def module(model):
        import torch

        class Step(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, tokens, positions, slots, kv):
                return self.m(tokens, positions, slots, kv.shape[0], rows_are_slots=True)

        return Step()


def build(args) -> dict:
    import torch
    from torch.export import Dim

    model = model_at(args.model, args.device, args.layers)
    longest = model.model.layers[0].self_attn.cache.k.shape[2] - 1
    started = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():
        exported = torch.export.export(
            _Step.module(model),
            step_inputs(args.device),
            dynamic_shapes=(None, None, None, {0: Dim("kv", min=16, max=longest - 1)}),
        )
    exported_at = time.perf_counter()
    # The package holds code only: a runner hands it the weights it already has.
    torch._inductor.aoti_compile_and_package(
        exported,
        package_path=args.package,
        inductor_configs={"aot_inductor.package_constants_in_so": False},
    )
    return {
        "row_kernels": model.row_kernels,
        "export_s": exported_at - started,
        "aoti_compile_s": time.perf_counter() - exported_at,
        "package_mb": os.path.getsize(args.package) / 1e6,
    }


def _replay_ms(graph, n: int = 200) -> float:
    import torch

    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(rounds)


def load(args) -> dict:
    t0 = time.perf_counter()
    import torch

    imported = time.perf_counter()
    import torch._inductor

    step = torch._inductor.aoti_load_package(args.package)
    loaded = time.perf_counter()
    model = model_at(args.model, args.device, args.layers)
    state = {f"m.{k}": v for k, v in model.state_dict().items()}
    state |= {f"m.{k}": v for k, v in model.named_buffers()}
    names = step.get_constant_fqns()
    missing = sorted(set(names) - set(state))
    if missing:
        raise SystemExit(f"package constants the model lacks: {missing[:5]}")
    gpu = args.device == "cuda"
    before = torch.cuda.memory_allocated() if gpu else 0
    started = time.perf_counter()
    step.load_constants({n: state[n] for n in names}, check_full_update=True, user_managed=True)
    inputs = step_inputs(args.device)
    with torch.inference_mode():
        out = step(*inputs)
        if gpu:
            torch.cuda.synchronize()
    first = time.perf_counter()
    # Held beyond the model's own tensors once the package ran (a copy of the weights,
    # folded constants): ~0 when the package only reads ours.
    added_mb = (torch.cuda.memory_allocated() - before) / 2**20 if gpu else 0.0
    result: dict = {
        "import_torch_s": imported - t0,
        "load_package_s": loaded - imported,  # torch._inductor's import included
        "constants_and_first_call_s": first - started,
        "constants": len(names),
        "gpu_memory_added_mb": added_mb,
        "logits_finite": bool(torch.isfinite(out).all()),
    }
    aoti_graph = None
    if args.device == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            step(*inputs)  # warm on the side stream, as the runner rehearses before a capture
            aoti_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(aoti_graph, stream=stream):
                aoti_out = step(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        aoti_graph.replay()
        torch.cuda.synchronize()
        result["graph_replay_equals_call"] = bool(torch.equal(aoti_out, out))
        out = aoti_out.clone()
    # The compiled runner on the same weights and inputs (it sets the cache up again: its
    # own tensors; the package is handed them before each comparison).
    from fermi.runners.torch_cuda import CudaGraphRunner

    built = time.perf_counter()
    runner = CudaGraphRunner(model, 1, MAX_SEQ_LEN, prefill_chunk=512, warmup="first")
    result["runner_warmup_s"] = time.perf_counter() - built
    result["runner_row_kernels"], result["runner_attention"] = (
        runner.row_kernels,
        runner.decode_attention,
    )
    want = runner.decode([0], [5], [POSITION]).float()
    result["max_abs_vs_runner"] = float((out.float() - want).abs().max())
    result["equal_to_runner"] = bool(torch.equal(out.float(), want))
    if aoti_graph is not None:
        state = {f"m.{k}": v for k, v in model.named_buffers()}
        step.load_constants(
            {n: state[n] for n in names if n in state}, check_full_update=False, user_managed=True
        )
        aoti_graph = torch.cuda.CUDAGraph()  # captured again over the runner's cache
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            step(*inputs)
            with torch.cuda.graph(aoti_graph, stream=stream):
                step(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        runner_graph = runner._graphs[("decode", 1, KV, None)].graph
        times = {"aoti": [], "runner": []}
        for _ in range(3):  # interleaved
            times["aoti"].append(_replay_ms(aoti_graph))
            times["runner"].append(_replay_ms(runner_graph))
        result["replay_ms"] = times
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="Qwen3-1.7B")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--layers", type=int, help="fewer layers than the model's (a dry run)")
    p.add_argument("--loads", type=int, default=2, help="fresh processes that load the package")
    p.add_argument("--child", choices=["build", "load"], help=argparse.SUPPRESS)
    p.add_argument("--package")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        print(json.dumps({"build": build, "load": load}[args.child](args)))
        return
    package = str(Path(tempfile.mkdtemp(prefix="fermi-aoti-")) / "step.pt2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result: dict = {"command": " ".join(sys.argv), "load_average": os.getloadavg()}
    own = [sys.executable, __file__, "--model", args.model, "--device", args.device]
    own += ["--package", package] + (["--layers", str(args.layers)] if args.layers else [])
    for part in ["build"] + ["load"] * args.loads:
        proc = subprocess.run(
            [*own, "--child", part], capture_output=True, text=True, env=env, timeout=1800
        )
        if proc.returncode:
            tail = proc.stderr.strip().splitlines()[-30:]
            result.setdefault(part, []).append({"error": tail})
            print(part, "failed:\n" + "\n".join(tail), flush=True)
            break
        result.setdefault(part, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(part, json.dumps(result[part][-1]), flush=True)
    import torch

    result["torch"] = torch.__version__
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
