"""Does programmatic dependent launch pay for a step of one-row products? (issue 17's lever)

A small model's decode step is mostly fixed cost per kernel: each product ramps up and
drains around a few microseconds of streaming (perf/LOG.md runs 11-13, 79). With
programmatic dependent launch (Hopper), a kernel's programs can be resident before the one
it depends on has finished: they wait (``griddepcontrol.wait``) only before reading its
output, and may load their own weights first, which no earlier kernel writes.

This times a chain of a model's four one-row products per layer (q/k/v, o, gate/up, down;
each reading the previous one's output, distinct weights a layer, more bytes than L2 holds)
in one CUDA graph, three ways, with the same GEMV code:

- ``plain``: ordinary launches;
- ``pdl``: launched with the PDL attribute, each program waiting at its start and letting
  its dependants launch at once;
- ``pdl_prefetch``: the same, with each program's first weight tile loaded before it waits.

Also ``fermi`` (the engine's own kernel, ``fermi.models.gemv.launch``, plain) as the anchor;
and, for the first model, the chain as fermi runs it: through ``torch.compile`` with the GEMV
as a ``triton_op`` and an Inductor kernel after q/k/v (``compiled``), and the same with PDL
on our kernels and Inductor's own (``compiled_pdl``: does Inductor keep ``launch_pdl``?).
Every variant's final output is checked against its baseline's (the same sums in the same
order: equal). Writes JSON (--out): microseconds a layer, the byte floor at the read
bandwidth measured in the same process.

    PYTHONPATH=$PWD python3 perf/micro_pdl.py --models Qwen3-0.6B Qwen3-1.7B --out $OUT/pdl.json
"""

from __future__ import annotations

# ruff: noqa: N803 (Triton style: pointer and constexpr arguments in capitals)
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))


@triton.jit
def _chain_gemv(
    X, W, Y, N, K, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GDC: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    ptrs = W + rows[:, None] * stride_w + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if PREFETCH:  # the weights are no earlier kernel's output: read before the wait
        w = tl.load(ptrs, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH:
        x = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        start = BLOCK_K
    else:
        start = 0
    for k0 in range(start, K, BLOCK_K):
        c = k0 + cols
        ok = c < K
        x = tl.load(X + c, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(ptrs + k0, mask=row_ok[:, None] & ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(Y + rows, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=row_ok)


def layer_shapes(name: str) -> list[tuple[str, int, int]]:
    """(product, N, K) of one layer, each K at most the previous N (it reads that output)."""
    from fermi.models.shapes import config

    c = config(name)
    h, d = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    inter = c["intermediate_size"]
    return [("qkv", q + 2 * kv, h), ("o", h, q), ("gate_up", 2 * inter, h), ("down", h, inter)]


_OP = None


def chain_op():
    """The GEMV as a ``triton_op`` (how fermi's row kernels enter a compiled layer)."""
    global _OP
    if _OP is None:
        from torch.library import triton_op, wrap_triton

        @triton_op("fermi_perf::chain_gemv", mutates_args={})
        def op(
            x: torch.Tensor, w: torch.Tensor, k: int, block_n: int, block_k: int, warps: int,
            pdl: bool,
        ) -> torch.Tensor:  # fmt: skip
            n = w.shape[0]
            out = x.new_empty(n)
            wrap_triton(_chain_gemv)[(triton.cdiv(n, block_n),)](
                x, w, out, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, GDC=pdl,
                PREFETCH=False, num_warps=warps, num_stages=1, launch_pdl=pdl,
            )  # fmt: skip
            return out

        _OP = op
    return _OP


def time_compiled(shapes, weights, x0, pdl: bool, replays: int) -> tuple[list[float], torch.Tensor]:
    """The chain compiled with ``torch.compile`` as fermi compiles a layer, with an
    elementwise op after q/k/v standing for rope, the q/k norms and the cache write (an
    Inductor kernel between two of ours), captured in a CUDA graph: with ``pdl`` our kernels
    launch with PDL and Inductor generates its own kernels with it (``triton.enable_pdl``).
    Returns microseconds per replay and the final output."""
    from fermi.models import gemv as G

    op = chain_op()
    flat = [w for ws in weights for w in ws]

    def chain(x, *flat):
        for i in range(len(weights)):
            for j, (product, n, k) in enumerate(shapes):
                block_n, block_k, warps, _ = G.launch_config(n, k)
                x = op(x, flat[i * len(shapes) + j], k, block_n, block_k, warps, pdl)
                if product == "qkv":
                    x = x * 1.0001 + 0.0001
        return x

    torch._dynamo.reset()
    fn = torch.compile(chain, fullgraph=True, options={"triton.enable_pdl": pdl})
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(x0, *flat)
        fn(x0, *flat)
    torch.cuda.current_stream().wait_stream(side)
    return captured_times(lambda: fn(x0, *flat), replays)


def captured_times(step, replays: int) -> tuple[list[float], torch.Tensor]:
    """``step`` captured in a CUDA graph: microseconds per replay, and its output."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        final = step()
    graph.replay()
    torch.cuda.synchronize()
    out = final.float().clone()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return times, out


def measure(name: str, layers: int, bandwidth: float, replays: int, compiled: bool) -> dict:
    from fermi.models import gemv as G

    dt = torch.bfloat16
    shapes = layer_shapes(name)
    weights = [
        [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _, n, k in shapes]
        for _ in range(layers)
    ]
    nbytes = sum(n * k * 2 for _, n, k in shapes)
    bufs = {p: torch.empty(n, device="cuda", dtype=dt) for p, n, _ in shapes}
    x0 = torch.randn(shapes[0][2], device="cuda", dtype=dt)

    def run(variant: str) -> torch.Tensor:
        x = x0
        for ws in weights:
            for (product, n, k), w in zip(shapes, ws, strict=True):
                out = bufs[product]
                block_n, block_k, warps, stages = G.launch_config(n, k)
                if variant == "fermi":
                    G.launch(x[:k].view(1, k), w, out.view(1, n), None, None, None, 1e-6, 0)
                else:
                    gdc = variant != "plain"
                    _chain_gemv[(triton.cdiv(n, block_n),)](
                        x, w, out, n, k, w.stride(0),
                        BLOCK_N=block_n, BLOCK_K=block_k, GDC=gdc,
                        PREFETCH=variant == "pdl_prefetch",
                        num_warps=warps, num_stages=stages, launch_pdl=gdc,
                    )  # fmt: skip
                x = out
        return x

    row: dict = {
        "model": name,
        "layers": layers,
        "products": [list(s) for s in shapes],
        "weight_mb_per_layer": nbytes / 1e6,
        "floor_us_per_layer": nbytes / bandwidth * 1e6,
    }
    finals = {}
    for variant in ("plain", "pdl", "pdl_prefetch", "fermi"):
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(variant)  # compiles
            torch.cuda.current_stream().wait_stream(side)
            times, finals[variant] = captured_times(lambda variant=variant: run(variant), replays)
            times = [t / layers for t in times]
            row[f"{variant}_us_per_layer"] = statistics.median(times)
            row[f"{variant}_us_range"] = [min(times), max(times)]
        except Exception as exc:  # a variant this torch/Triton/driver cannot capture
            row[f"{variant}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps({k: v for k, v in row.items() if k != "products"}), flush=True)
    if compiled:
        for variant, pdl in (("compiled", False), ("compiled_pdl", True)):
            try:
                times, final = time_compiled(shapes, weights, x0, pdl, replays)
                finals[variant] = final
                row[f"{variant}_us_per_layer"] = statistics.median(times) / layers
                row[f"{variant}_us_range"] = [min(times) / layers, max(times) / layers]
            except Exception as exc:  # Inductor may refuse launch_pdl on a user kernel
                row[f"{variant}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps({k: v for k, v in row.items() if k != "products"}), flush=True)
    pairs = {v: "plain" for v in ("pdl", "pdl_prefetch", "fermi")} | {"compiled_pdl": "compiled"}
    row["max_abs_diff"] = {  # each variant against its own baseline: equal sums, so 0
        f"{v}_vs_{base}": (finals[v] - finals[base]).abs().max().item()
        for v, base in pairs.items()
        if v in finals and base in finals
    }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=["Qwen3-0.6B", "Qwen3-1.7B"])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled variants")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    from bench_decode import measure_read_bandwidth

    bandwidth = measure_read_bandwidth()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "rows": [],
    }
    for name in args.models:
        compiled = name == args.models[0] and not args.no_compiled
        result["rows"].append(measure(name, args.layers, bandwidth, args.replays, compiled))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
