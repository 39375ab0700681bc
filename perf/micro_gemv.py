"""One-row products on the GPU: cuBLAS (``F.linear``) against the fused Triton GEMV.

For every weight shape of the Qwen3 sizes, times a CUDA graph that runs the product over
enough distinct weight copies (>= 256 MB in all) that no copy is still in L2 when it is read
again, as in a decode step. Reports microseconds per product and the read bandwidth, for
cuBLAS and for a sweep of launch configurations of ``fermi.models.gemv``; then, with the
chosen configuration, each product as the layer runs it: cuBLAS plus the unfused small ops
(RMSNorm, silu x up, residual add) against the one fused kernel. Writes JSON to --out.

    PYTHONPATH=$PWD python3 perf/micro_gemv.py --out $OUT/gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

MODELS = ("Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B")
SWEEP = list(itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (1, 3)))
FUSED_SWEEP = list(itertools.product((4, 8, 16), (512, 1024), (4, 8), (1,)))


def products(name: str) -> list[tuple[str, int, int]]:
    from fermi.models.shapes import config

    c = config(name)
    h, d = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    inter = c["intermediate_size"]
    return [
        ("qkv", q + 2 * kv, h),
        ("o", h, q),
        ("gate_up", 2 * inter, h),
        ("down", h, inter),
        ("lm_head", c["vocab_size"], h),
    ]


def time_graph(fn, calls: int, repeats: int = 7) -> float:
    """Median microseconds per call of ``fn`` (which makes ``calls`` products) in a graph."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from fermi.models import gemv as G

    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--out", required=True)
    p.add_argument("--sweep", action="store_true", help="time every launch configuration")
    p.add_argument("--fused-sweep", action="store_true", help="the same for the fused kernels")
    args = p.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    started = time.perf_counter()
    for name in args.models:
        for kind, n, k in products(name):
            size = n * k * 2
            copies = max(2, math.ceil(256e6 / size))
            ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
            x = torch.randn(1, k, device=dev, dtype=dt)
            out = torch.empty(1, n, device=dev, dtype=dt)
            row = {"model": name, "product": kind, "n": n, "k": k, "mb": size / 1e6}

            def cublas(x=x, ws=ws):
                for w in ws:
                    F.linear(x, w)

            row["cublas_us"] = time_graph(cublas, copies)
            configs = SWEEP if args.sweep else [G.launch_config(n, k)]
            timed = []
            for cfg in configs:

                def ours(x=x, ws=ws, out=out, cfg=cfg):
                    for w in ws:
                        G.launch(x, w, out, None, None, None, 1e-6, 0, cfg)

                try:
                    timed.append((time_graph(ours, copies), cfg))
                except Exception as exc:  # a configuration the compiler rejects
                    print(f"{cfg}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            timed.sort()
            row["ours_us"], row["best_config"] = timed[0][0], list(timed[0][1])
            default = G.launch_config(n, k)
            row["default_config"] = list(default)
            row["default_us"] = next((t for t, c in timed if c == default), None)
            row["top5"] = [[round(t, 2), list(c)] for t, c in timed[:5]]
            for key in ("cublas", "ours", "default"):
                us = row[f"{key}_us"]
                row[f"{key}_gb_s"] = None if us is None else size / us / 1e3

            # As the layer runs it: the unfused ops around cuBLAS vs the fused kernel.
            norm_w = torch.rand(k, device=dev, dtype=dt) + 0.5
            res = torch.randn(1, n, device=dev, dtype=dt)
            xin = torch.randn(1, 2 * k, device=dev, dtype=dt) if kind == "down" else x
            fused = {
                "qkv": {"norm_weight": norm_w},
                "o": {"residual": res},
                "gate_up": {"norm_weight": norm_w},
                "down": {"act": G.ACT_SILU_MUL, "residual": res},
                "lm_head": {"norm_weight": norm_w},
            }[kind]

            def unfused(ws=ws, fused=fused, xin=xin):
                for w in ws:
                    G.gemv_reference(xin, w, **fused)

            def fused_run(ws=ws, fused=fused, xin=xin):
                for w in ws:
                    G.gemv(xin, w, **fused)

            row["unfused_us"] = time_graph(unfused, copies)
            row["fused_us"] = time_graph(fused_run, copies)
            if args.fused_sweep:
                timed = []
                args_of = {
                    "bias": None,
                    "norm_weight": fused.get("norm_weight"),
                    "residual": fused.get("residual"),
                    "eps": 1e-6,
                    "act": fused.get("act", 0),
                }
                out2 = torch.empty(1, n, device=dev, dtype=dt)
                for cfg in FUSED_SWEEP:

                    def fused_cfg(ws=ws, xin=xin, out2=out2, cfg=cfg, a=args_of):
                        for w in ws:
                            G.launch(xin, w, out2, config=cfg, **a)

                    timed.append((time_graph(fused_cfg, copies), cfg))
                timed.sort()
                row["fused_top5"] = [[round(t, 2), list(c)] for t, c in timed[:5]]
            want = G.gemv_reference(xin, ws[0], **fused).float()
            got = G.gemv(xin, ws[0], **fused).float()
            row["fused_max_rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
            del ws
            torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in row.items() if k != "top5"}), flush=True)
            result["rows"].append(row)
            Path(args.out).write_text(json.dumps(result, indent=1))
    result["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
