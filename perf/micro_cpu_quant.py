"""Weight-only int8/int4 products on this CPU: which kernel ``QuantLinear`` should use.

Times one decode step's products at SmolLM2-135M's shapes (30 layers x qkv, o, gate_up,
down, plus the lm_head; a distinct weight per layer, as a step reads them) at 1 and 4 rows,
for each way of doing them, in interleaved rounds (every option once per round, medians
over rounds), at each thread count asked for:

- fp32 / fp16 storage (``HalfWeightLinear``, today's CPU default for quantized GGUF files);
- torch's packed kernels, ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``
  (groups of 32 and 64), with bf16 activations and with float32 ones;
- dequantize then matmul (float32);
- torchao's int8 weight-only (when ``import torchao`` works; its CPU int4 path is the same
  aten kernel as above).

    python perf/micro_cpu_quant.py --threads 1 2 --out perf/results/cpu_quant_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent))

from fermi.models import quant as Q
from fermi.models.half_weights import HalfWeightLinear

HIDDEN, INTER, LAYERS, VOCAB = 576, 1536, 30, 49152
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
SHAPES = [
    ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    (HIDDEN, HEADS * HEAD_DIM),
    (2 * INTER, HIDDEN),
    (HIDDEN, INTER),
]


def dequant_int4(w: Q.QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.dequantize(torch.float32))


def build(with_torchao: bool) -> dict[str, list]:
    """Per option, the list of (callable taking x) for one step's products."""
    torch.manual_seed(0)
    options: dict[str, list] = {}
    scratch: list = [None]
    mats = [s for _ in range(LAYERS) for s in SHAPES] + [(VOCAB, HIDDEN)]
    ao_quantize = None
    if with_torchao:
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            ao_quantize = (quantize_, Int8WeightOnlyConfig)
        except Exception as exc:
            print(f"torchao not used: {type(exc).__name__}: {exc}", file=sys.stderr)
    for n, k in mats:
        w = torch.randn(n, k) * 0.02
        linear = torch.nn.Linear(k, n, bias=False)
        linear.weight.data = w
        q8, q4, q4g64 = Q.quantize_int8(w), Q.quantize_int4(w, 32), Q.quantize_int4(w, 64)
        cpu8 = Q.QuantLinear(q8, None, "cpu", torch.float32)
        cpu4 = Q.QuantLinear(q4, None, "cpu", torch.float32)
        cpu4g64 = Q.QuantLinear(q4g64, None, "cpu", torch.float32)
        s8_32 = cpu8.scales.float()
        pairs32 = cpu4.scales.float()
        half = HalfWeightLinear(linear, scratch)
        add = options.setdefault
        add("fp32", []).append(lambda x, w=w: F.linear(x, w))
        add("fp16 storage (HalfWeightLinear)", []).append(half)
        add("int8 aten, bf16 activations (QuantLinear)", []).append(cpu8)
        add("int8 aten, fp32 activations", []).append(
            lambda x, c=cpu8.codes, s=s8_32: torch.ops.aten._weight_int8pack_mm(x, c, s)
        )
        add("int4 g32 aten, bf16 activations (QuantLinear)", []).append(cpu4)
        add("int4 g64 aten, bf16 activations", []).append(cpu4g64)
        add("int4 g32 aten, fp32 activations", []).append(
            lambda x, c=cpu4.codes, p=pairs32: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, c, 32, p
            )
        )
        add("int8 dequantize + matmul", []).append(
            lambda x, c=cpu8.codes, s=s8_32: F.linear(x, c.float() * s[:, None])
        )
        add("int4 g32 dequantize + matmul", []).append(lambda x, q=q4: dequant_int4(q, x))
        if ao_quantize is not None:
            ao = torch.nn.Linear(k, n, bias=False)
            ao.weight.data = w.clone()
            ao_quantize[0](ao, ao_quantize[1]())
            add("torchao int8 weight-only (fp32)", []).append(ao)
    return options


def step(products: list, rows: int) -> float:
    inputs = {k: torch.randn(rows, k) for k in {HIDDEN, HEADS * HEAD_DIM, INTER}}
    started = time.perf_counter()
    for i, fn in enumerate(products):
        k = SHAPES[i % len(SHAPES)][1] if i < len(products) - 1 else HIDDEN
        fn(inputs[k])
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--rows", type=int, nargs="*", default=[1, 4])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    options = build(not args.no_torchao)
    result: dict = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})",
        "note": "shared machine: other jobs ran during the measurement (load average below); "
        "options interleaved in every round, medians over rounds",
        "load_average_before": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "step": "SmolLM2-135M: 30 layers x (qkv 960x576, o 576x576, gate_up 3072x576, "
        "down 576x1536) + lm_head 49152x576",
        "ms_per_step": {},
    }
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rows in args.rows:
                times: dict[str, list[float]] = {name: [] for name in options}
                for products in options.values():  # warm-up
                    step(products, rows)
                for _ in range(args.rounds):
                    for name, products in options.items():
                        times[name].append(step(products, rows))
                key = f"threads {threads}, rows {rows}"
                result["ms_per_step"][key] = {
                    name: {
                        "median": round(1e3 * statistics.median(t), 2),
                        "min": round(1e3 * min(t), 2),
                        "max": round(1e3 * max(t), 2),
                    }
                    for name, t in times.items()
                }
                print(key, flush=True)
                for name, t in times.items():
                    print(f"  {name:50s} {1e3 * statistics.median(t):8.2f} ms", flush=True)
    result["load_average_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
