"""Our int8/int4 products against the kernels of others on the same weights (issue 20).

For each weight shape of the Qwen3 sizes asked for (``micro_gemv.products``), at 1 and at
``--rows`` rows of input, times in a CUDA graph over enough distinct weight copies
(>= 256 MB of bf16) that none is still in L2 when read again:

- cuBLAS bf16 on the float weight;
- ours: ``QuantLinear.row`` (one row: the fused one-row kernels) and ``QuantLinear`` (more);
- int4: torch's tile-packed CUDA kernel (``aten._weight_int4pack_mm``, the kernel torchao's
  int4 weight-only layout calls) at inner-K tiles 2, 4 and 8, its scales and zeros in bf16
  (``zero = min + 8 scale``, the same codes);
- int4 and int8: GemLite (``--gemlite``, when it imports), the same codes, scales and
  minimums (int4: ``w = q scale + min``, its "fma mode"; int8: a scale per row);
- int8: ``aten._weight_int8pack_mm`` where torch has it on CUDA, and inductor's own kernel
  for ``linear(x, codes.to(bf16)) * scale`` (what torchao's int8 weight-only compiles to).

After its timing each kernel's output is compared with the product of the dequantized
weight in float32 (largest difference over the largest magnitude). Writes JSON to --out.

    PYTHONPATH=$PWD python3 perf/micro_quant_libraries.py --models Qwen3-8B Qwen3-1.7B \\
        --gemlite --out $OUT/quant_libraries.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from micro_gemv import products, time_graph

# --device cpu: a dry run of the script's own code (wall-clock times, no graphs).
DEVICE = "cuda"


def wall_us(fn, calls: int) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e6 / calls


def measure(row: dict, label: str, make, copies: int, want, m: int) -> None:
    """``make()`` -> (fn making the products over every copy, fn returning the last
    output): its microseconds per product in a graph, then its output's error against
    ``want``, into ``row``; a kernel that fails is reported there and skipped."""
    import torch

    try:
        fn, last = make()
        fn()  # warm-up: compiles and autotunes outside the graph
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        us = time_graph(fn, copies) if DEVICE == "cuda" else wall_us(fn, copies)
        y = last().float()
        row[f"{label}_{m}_us"] = round(us, 3)
        row[f"{label}_{m}_err"] = float((y - want).abs().max() / want.abs().max())
    except Exception as exc:
        row[f"{label}_{m}_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        traceback.print_exc(limit=3)


def over(fns: list) -> tuple:
    """(fn calling each of ``fns``, fn returning the last one's output)."""
    out: list = [None]

    def run():
        for f in fns:
            out[0] = f()

    return run, lambda: out[0]


def tinygemm_pack(q, tiles: int, group: int) -> tuple:
    """An int4 weight in torch's tile-packed CUDA layout: (packed codes, [K/group, N, 2]
    bf16 scales and zeros, w = (q - 8) scale + zero)."""
    import torch

    from fermi.models import quant as Q

    v = Q.unpack_int4(q.codes, group)
    packed = (v[:, ::2] << 4 | v[:, 1::2]).contiguous()
    s = q.scales.half().float()
    z = q.mins.half().float() + 8.0 * s
    sz = torch.stack((s.t(), z.t()), dim=-1).to(torch.bfloat16).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(packed, tiles), sz


def gemlite_layers(q4: list, q8: list, n: int, k: int, group: int) -> dict:
    """GemLite layers of the same weights: int4 with fp16 and with bf16 scales and
    minimums, int8 with a bf16 scale a row."""
    import torch
    from gemlite.core import DType, GemLiteLinearTriton

    from fermi.models import quant as Q

    out: dict = {}
    for meta in (torch.float16, torch.bfloat16):
        out[meta] = []
        for q in q4:
            lin = GemLiteLinearTriton(
                4,
                group_size=group,
                in_features=k,
                out_features=n,
                input_dtype=DType.BF16,
                output_dtype=DType.BF16,
            )
            s = q.scales.to(meta)
            codes = Q.unpack_int4(q.codes, group).contiguous()
            lin.pack(codes, s, torch.zeros_like(s), None, fma_mode=True)
            with torch.no_grad():  # in fma mode w = q scale + zeros: our minimums
                lin.zeros.copy_(q.mins.to(meta).t())
            out[meta].append(lin)
    out["int8"] = []
    for q in q8:
        lin = GemLiteLinearTriton(
            8,
            group_size=k,
            in_features=k,
            out_features=n,
            input_dtype=DType.BF16,
            output_dtype=DType.BF16,
        )
        lin.pack(q.codes, q.scales.to(torch.bfloat16).view(n, 1), None, None)
        out["int8"].append(lin)
    return out


def shape_row(name: str, kind: str, n: int, k: int, rows: list[int], with_gemlite: bool) -> dict:
    """Every kernel at one weight shape, at 1 and at each of ``rows`` rows of input."""
    import torch
    import torch.nn.functional as F

    from fermi.models import quant as Q

    dev, dt, group = DEVICE, torch.bfloat16, Q.INT4_GROUP
    copies = max(2, math.ceil(256e6 / (n * k * 2)))
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
    q4 = [Q.quantize(w, "int4", group) for w in ws]
    q8 = [Q.quantize(w, "int8") for w in ws]
    l4 = [Q.QuantLinear(q, None, dev, dt) for q in q4]
    l8 = [Q.QuantLinear(q, None, dev, dt) for q in q8]
    # the same weights in others' layouts
    row: dict = {"model": name, "product": kind, "n": n, "k": k, "copies": copies}
    tiny: dict = {}
    for tiles in (2, 4, 8):
        try:
            tiny[tiles] = [tinygemm_pack(q, tiles, group) for q in q4]
        except Exception as exc:
            row[f"tinygemm_int4_tiles{tiles}_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    gl: dict = {}
    if with_gemlite:
        try:
            gl = gemlite_layers(q4, q8, n, k, group)
        except Exception as exc:
            row["gemlite_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc(limit=3)
    compiled8 = torch.compile(lambda x, c, s: F.linear(x, c.to(x.dtype)) * s, dynamic=False)
    for m in [1, *rows]:
        x = torch.randn(m, k, device=dev, dtype=dt)
        want4 = F.linear(x.float(), l4[-1].dequantized(torch.float32))
        want8 = F.linear(x.float(), l8[-1].dequantized(torch.float32))
        wantf = F.linear(x.float(), ws[-1].float())

        def fns(items, call, x=x):
            return lambda: over([(lambda it=it: call(x, it)) for it in items])

        measure(row, "cublas_bf16", fns(ws, lambda x, w: F.linear(x, w)), copies, wantf, m)
        ours = (lambda x, q: q.row(x)) if m == 1 else (lambda x, q: q(x))
        measure(row, "ours_int4", fns(l4, ours), copies, want4, m)
        measure(row, "ours_int8", fns(l8, ours), copies, want8, m)
        for tiles, packed in tiny.items():
            call = lambda x, p: torch.ops.aten._weight_int4pack_mm(x, p[0], group, p[1])  # noqa: E731
            measure(row, f"tinygemm_int4_tiles{tiles}", fns(packed, call), copies, want4, m)
        call = lambda x, q: torch.ops.aten._weight_int8pack_mm(x, q.codes, q.scales.to(dt))  # noqa: E731
        measure(row, "aten_int8pack", fns(q8, call), copies, want8, m)
        scaled = [(q.codes, q.scales.to(dt)) for q in q8]
        call = lambda x, cs: compiled8(x, cs[0], cs[1])  # noqa: E731
        measure(row, "inductor_int8", fns(scaled, call), copies, want8, m)
        for key, lins in gl.items():
            label = "gemlite_int8" if key == "int8" else f"gemlite_int4_{str(key)[6:]}meta"
            measure(
                row,
                label,
                fns(lins, lambda x, lin: lin(x)),
                copies,
                want8 if key == "int8" else want4,
                m,
            )
    return row


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=["Qwen3-8B", "Qwen3-1.7B"])
    p.add_argument("--rows", type=int, nargs="*", default=[8])
    p.add_argument("--products", nargs="*", default=None, help="default: all but lm_head")
    p.add_argument("--gemlite", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.manual_seed(0)
    result: dict = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
        "torch": torch.__version__,
        "rows": [],
        "notes": [],
    }
    gemlite = None
    if args.gemlite:
        try:
            import gemlite

            result["gemlite"] = getattr(gemlite, "__version__", "?")
        except Exception as exc:
            result["notes"].append(f"gemlite did not import: {exc!r}")
    started = time.perf_counter()

    for name in args.models:
        for kind, n, k in products(name):
            if (args.products is None and kind == "lm_head") or (
                args.products is not None and kind not in args.products
            ):
                continue
            row = shape_row(name, kind, n, k, args.rows, gemlite is not None)
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            Path(args.out).write_text(json.dumps(result, indent=1))
    result["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
