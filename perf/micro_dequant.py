"""Prefill's int8/int4 products on the GPU: the weight dequantized by torch's operations
against the Triton kernel of ``fermi.models.quant_mm`` (LOG run 78).

For each weight shape of the Qwen3 sizes asked for (``micro_gemv.products``, lm_head
left out: a prefill multiplies only its last row there), times in a CUDA graph, over
enough distinct weight copies (>= 256 MB of bf16) that none is still in L2: the dequantize
alone both ways, and the whole product at ``--rows`` rows (dequantize + cuBLAS) both ways
beside cuBLAS on the bf16 weight. Writes JSON to --out.

    PYTHONPATH=$PWD python3 perf/micro_dequant.py --models Qwen3-8B Qwen3-1.7B \\
        --out $OUT/dequant.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from micro_gemv import products, time_graph


def main() -> None:
    import torch
    import torch.nn.functional as F

    from fermi.models import quant as Q
    from fermi.models import quant_mm as QM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=["Qwen3-8B", "Qwen3-1.7B"])
    p.add_argument("--rows", type=int, nargs="*", default=[128, 2048])
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
    for name in args.models:
        for kind, n, k in products(name):
            if kind == "lm_head":
                continue
            copies = max(2, math.ceil(256e6 / (n * k * 2)))
            ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
            row = {"model": name, "product": kind, "n": n, "k": k, "copies": copies}
            for scheme in ("int8", "int4"):
                layers = [Q.QuantLinear(Q.quantize(w, scheme), None, dev, dt) for w in ws]
                parts = [(q.codes, q.scales, q.mins) for q in layers]
                for label, fn in (("torch", QM.dequantize_torch), ("triton", QM.dequantize)):

                    def deq(fn=fn, parts=parts):
                        for c, s, m in parts:
                            fn(c, s, m, dt)

                    row[f"{scheme}_dequantize_{label}_us"] = round(time_graph(deq, copies), 2)
                for m in args.rows:
                    x = torch.randn(m, k, device=dev, dtype=dt)
                    for label, fn in (("torch", QM.dequantize_torch), ("triton", QM.dequantize)):

                        def product(fn=fn, parts=parts, x=x):
                            for c, s, mn in parts:
                                F.linear(x, fn(c, s, mn, dt))

                        us = time_graph(product, copies)
                        row[f"{scheme}_{m}rows_{label}_us"] = round(us, 2)
                del layers, parts
            for m in args.rows:
                x = torch.randn(m, k, device=dev, dtype=dt)

                def cublas(x=x, ws=ws):
                    for w in ws:
                        F.linear(x, w)

                row[f"bf16_{m}rows_us"] = round(time_graph(cublas, copies), 2)
            del ws
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            Path(args.out).write_text(json.dumps(result, indent=1))
    result["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
