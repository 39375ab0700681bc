"""Where SmolLM2-135M's CPU decode step goes: its products against everything else, and
how the products and a plain read scale from one thread to two (issue 20).

Each OpenMP wait policy (``--policies``, default ACTIVE and PASSIVE) runs in a process of
its own (OpenMP reads the policy once). In each:

- ``step``: ``TorchRunner.decode`` at one row (the engine's eager CPU path, fp16 storage
  packed for FBGEMM, as ``perf/ops_cpu_smollm2.py`` builds it) on one thread, the whole
  step against the same step with every product replaced by zeros of its output's shape:
  the difference is what the products cost inside a step, the rest the step's other work
  (attention, norms, rope, the cache write, dispatch). Interleaved rounds, median and
  minimum of ``--steps`` steps each;
- ``products``: each kind of product of one step (q/k/v, o, gate/up, down: 30 each; the
  head once) run alone on one and on two threads, one row, medians over rounds;
- ``read``: summing a 269 MB fp16 tensor (the weights a step reads) on one and two threads:
  the read bandwidth a thread, and two, get here.

    flock /tmp/fermi-bench.lock .venv/bin/python perf/cpu_step_parts.py \\
        --out perf/results/cpu_step_parts.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(rounds: int, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "perf"))
    import torch
    from ops_cpu_smollm2 import make_runner, step_times

    import fermi.models.half_weights as H

    torch.set_num_threads(1)
    runner = make_runner()
    runner.prefill(0, list(range(100, 245)), 0)
    pos = 150
    real = H.HalfWeightLinear.forward

    def zeros(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)

    step = {"full": [], "products_zeroed": []}
    for _ in range(rounds):
        for name, forward in (("full", real), ("products_zeroed", zeros)):
            H.HalfWeightLinear.forward = forward
            times = step_times(runner, pos, steps)
            pos += steps
            step[name].append({"median_ms": round(statistics.median(times) * 1e3, 2),
                               "min_ms": round(min(times) * 1e3, 2)})  # fmt: skip
    H.HalfWeightLinear.forward = real

    kinds: dict[str, list] = {}
    for name, module in runner.model.named_modules():
        if isinstance(module, H.HalfWeightLinear):
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    inputs = {k: torch.randn(1, 1, v[0].in_features) for k, v in kinds.items()}

    def run(kind):
        for module in kinds[kind]:
            torch.ops.quantized.linear_dynamic_fp16(inputs[kind], module._pack)

    samples: dict[tuple, list] = {}
    for _ in range(rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for kind in kinds:
                ms = median_ms(lambda kind=kind: run(kind), 3)
                samples.setdefault((kind, threads), []).append(ms)
    products = {}
    for kind, modules in kinds.items():
        mb = sum(m.in_features * m.out_features * 2 for m in modules) / 1e6
        row = {"count": len(modules), "mb": round(mb, 1)}
        for threads in (1, 2):
            ms = statistics.median(samples[(kind, threads)])
            row[f"{threads}_thread_ms"] = round(ms, 2)
            row[f"{threads}_thread_gb_s"] = round(mb / ms, 1)
        products[kind] = row
    for threads in (1, 2):
        products.setdefault("all", {})[f"{threads}_thread_ms"] = round(
            sum(products[k][f"{threads}_thread_ms"] for k in kinds), 2
        )

    weights = torch.ones(269 * 10**6 // 2, dtype=torch.float16)
    read = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ms = statistics.median(median_ms(weights.sum, 5) for _ in range(rounds))
        read[f"{threads}_thread"] = {"ms": round(ms, 2), "gb_s": round(269 / ms, 1)}
    return {"step_1_thread": step, "products": products, "read_269mb": read}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policies", nargs="+", default=["ACTIVE", "PASSIVE"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.rounds, args.steps)))
        return
    result = {"command": " ".join(sys.argv), "load_average_before": os.getloadavg()}
    result["by_policy"] = {}
    for policy in args.policies:
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--rounds", str(args.rounds),
             "--steps", str(args.steps)],
            env={**os.environ, "OMP_WAIT_POLICY": policy}, capture_output=True, text=True,
            check=True,
        )  # fmt: skip
        result["by_policy"][policy] = json.loads(done.stdout.strip().splitlines()[-1])
        print(policy, json.dumps(result["by_policy"][policy]), flush=True)
    result["load_average_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
