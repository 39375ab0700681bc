"""int8/int4 products on the GPU against bf16: the one-row kernels and the few-row kernel.

For every weight shape of the Qwen3 sizes (``micro_gemv.products``), times in a CUDA graph,
over enough distinct weight copies (>= 256 MB of bf16) that none is still in L2 when read
again: cuBLAS bf16, our bf16 one-row kernel, and our int8 and int4 one-row kernels at their
default launch configuration and (``--sweep``) at every configuration of a grid; then, at
``--rows`` (default 4 and 16), cuBLAS bf16 against the few-row kernel of
``fermi.models.quant_mm`` (``--sweep`` too). Reports microseconds per product and the bytes
read per second. Writes JSON to --out.

    PYTHONPATH=$PWD python3 perf/micro_gemv_quant.py --models Qwen3-1.7B Qwen3-8B \\
        --sweep --out $OUT/gemv_quant.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from micro_gemv import MODELS, products, time_graph

ROW_SWEEP = list(itertools.product((2, 4, 8), (512, 1024, 2048, 4096), (4, 8), (1, 2)))
# int4 also at 16 rows a program for the shorter steps: the word-read kernel
# (patches/int4_row_words.patch) holds 96 registers a thread at 16 x 1,024 (LOG run 76).
ROW_SWEEP_INT4 = ROW_SWEEP + list(itertools.product((16,), (512, 1024, 2048), (4, 8), (1, 2)))
FEW_SWEEP = list(itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (2, 3)))


def main() -> None:
    import torch
    import torch.nn.functional as F

    from fermi.models import gemv as G
    from fermi.models import quant as Q
    from fermi.models import quant_mm as QM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--rows", type=int, nargs="*", default=[4, 16])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--schemes", nargs="*", default=None, help="int8 and/or int4 [default: both]")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    result = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": [],
    }
    started = time.perf_counter()

    def best(fn_of_cfg, configs, copies, out, want, sweep_log):
        """Time each configuration; after its timing, its output (of the last weight copy)
        against ``want``: the largest difference over the largest |want|. A configuration
        off by more than bf16's rounding is reported and left out."""
        timed = []
        for cfg in configs:
            try:
                fn = fn_of_cfg(cfg)
                us = time_graph(fn, copies)
                out.fill_(float("nan"))
                fn()
                err = float((out.float() - want).abs().max() / want.abs().max())
            except Exception as exc:  # a configuration the compiler rejects
                print(f"{cfg}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
                continue
            sweep_log.append([list(cfg), round(us, 3), err])
            if not err <= 2e-2:  # NaN too
                print(f"{cfg}: wrong output (relative error {err})", file=sys.stderr)
                continue
            timed.append((us, cfg))
        timed.sort(key=lambda t: t[0])
        return timed

    for name in args.models:
        for kind, n, k in products(name):
            bf16_bytes = n * k * 2
            copies = max(2, math.ceil(256e6 / bf16_bytes))
            ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
            layers = {
                scheme: [
                    Q.QuantLinear(Q.quantize(w, scheme, args.group_size), None, dev, dt) for w in ws
                ]
                for scheme in (args.schemes or Q.SCHEMES)
            }
            x = torch.randn(1, k, device=dev, dtype=dt)
            out = torch.empty(1, n, device=dev, dtype=dt)
            row = {"model": name, "product": kind, "n": n, "k": k, "copies": copies}

            def cublas(x=x, ws=ws):
                for w in ws:
                    F.linear(x, w)

            def bf16_row(x=x, ws=ws, out=out):
                for w in ws:
                    G.launch(x, w, out, None, None, None, 1e-6, 0)

            row["cublas_bf16_us"] = time_graph(cublas, copies)
            row["row_bf16_us"] = time_graph(bf16_row, copies)
            for scheme, qs in layers.items():
                nbytes = qs[0].nbytes

                def int8_of(cfg, qs=qs, x=x, out=out):
                    def run():
                        for q in qs:
                            G.launch(x, q.codes, out, None, None, None, 1e-6, 0, cfg, q.scales)

                    return run

                def int4_of(cfg, qs=qs, x=x, out=out):
                    def run():
                        for q in qs:
                            G.launch_int4(
                                x, q.codes, q.scales, q.mins, out, None, None, None, 1e-6, 0, cfg
                            )

                    return run

                make = int8_of if scheme == "int8" else int4_of
                default = (
                    G.launch_config(n, k, 1)
                    if scheme == "int8"
                    else G.launch_config_int4(n, k, args.group_size)
                )
                configs = [default]
                if args.sweep:
                    configs += [
                        c
                        for c in (ROW_SWEEP if scheme == "int8" else ROW_SWEEP_INT4)
                        if c != default
                    ]
                want = F.linear(x.float(), qs[-1].dequantized(torch.float32))
                row[f"row_{scheme}_sweep"] = []
                timed = best(make, configs, copies, out, want, row[f"row_{scheme}_sweep"])
                us_default = next((t for t, c in timed if c == default), None)
                if us_default is None:
                    raise SystemExit(f"{name} {kind} {scheme}: the default {default} failed")
                row[f"row_{scheme}_us"] = us_default
                row[f"row_{scheme}_gb_s"] = nbytes / us_default / 1e3
                row[f"row_{scheme}_vs_cublas_bf16"] = row["cublas_bf16_us"] / us_default
                row[f"row_{scheme}_top3"] = [[round(t, 2), list(c)] for t, c in timed[:3]]
                for m in args.rows:
                    xm = torch.randn(m, k, device=dev, dtype=dt)
                    outm = torch.empty(m, n, device=dev, dtype=dt)

                    def cublas_m(xm=xm, ws=ws):
                        for w in ws:
                            F.linear(xm, w)

                    def few_of(cfg, qs=qs, xm=xm, outm=outm):
                        def run():
                            for q in qs:
                                QM.launch_few_rows(xm, q.codes, q.scales, q.mins, None, outm, cfg)

                        return run

                    few_default = QM.few_rows_config(n, k, scheme == "int4", args.group_size)
                    few_configs = [few_default] + (
                        [c for c in FEW_SWEEP if c != few_default] if args.sweep else []
                    )
                    want_m = F.linear(xm.float(), qs[-1].dequantized(torch.float32))
                    log = row[f"few_{scheme}_{m}rows_sweep"] = []
                    timed = best(few_of, few_configs, copies, outm, want_m, log)
                    us = next((t for t, c in timed if c == few_default), None)
                    if us is None:
                        failed = f"{name} {kind} {scheme}: the default {few_default} failed"
                        raise SystemExit(failed)
                    row[f"cublas_bf16_{m}rows_us"] = time_graph(cublas_m, copies)
                    row[f"few_{scheme}_{m}rows_us"] = us
                    row[f"few_{scheme}_{m}rows_top3"] = [
                        [round(t, 2), list(c)] for t, c in timed[:3]
                    ]
            del ws, layers
            torch.cuda.empty_cache()
            print(
                json.dumps({k: v for k, v in row.items() if "top3" not in k and "sweep" not in k}),
                flush=True,
            )
            result["rows"].append(row)
            Path(args.out).write_text(json.dumps(result, indent=1))
    result["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
