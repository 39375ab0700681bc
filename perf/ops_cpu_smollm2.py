"""Count what one SmolLM2-135M decode step dispatches on CPU, and time the step.

Runs ``TorchRunner.decode`` (the engine's CPU path, fp16 weight storage) after a 145-token
prefill and reports:

- the aten ops one step dispatches (a ``TorchDispatchMode`` counter: every op that reaches
  a kernel, views included), per layer and in the rest of the step;
- the profiler's self CPU time per op name over ``--steps`` steps (``record_shapes``);
- the median step time over ``--steps`` un-profiled steps (the model alone, no sampling).

Run from the repository root (take the bench lock, the cores are shared)::

    flock /tmp/fermi-bench.lock .venv/bin/python perf/ops_cpu_smollm2.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def make_runner(dtype: str = "fp16"):
    from fermi.aliases import alias_path
    from fermi.gguf import load_gguf
    from fermi.runners.torch_eager import TorchRunner

    ckpt = load_gguf(alias_path("smollm2-135m"), torch.device("cpu"), dtype)
    return TorchRunner(ckpt.model, max_batch=1, max_seq_len=1024)


def step_times(runner, start: int, steps: int) -> list[float]:
    times, token = [], 1000
    for i in range(steps):
        t0 = time.perf_counter()
        logits = runner.decode([0], [token], [start + i])
        times.append(time.perf_counter() - t0)
        token = int(logits[0].argmax())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runner = make_runner()
    layers = len(runner.model.model.layers)
    runner.prefill(0, list(range(100, 245)), 0)
    pos = 145
    step_times(runner, pos, 5)  # warm-up
    pos += 5

    counter = OpCounter()
    with torch.inference_mode(), counter:
        runner.decode([0], [1000], [pos])
    pos += 1
    total = sum(counter.ops.values())

    # One layer's ops, counted by running a single layer the way the decoder does.
    per_layer = collections.Counter({k: v // layers for k, v in counter.ops.items() if v >= layers})

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step_times(runner, pos, 10)
    pos += 10
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)

    times = step_times(runner, pos, args.steps)
    result = {
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "ops_per_step": total,
        "ops_by_name": dict(counter.ops.most_common()),
        "ops_per_layer_estimate": sum(per_layer.values()),
        "step_ms_median": round(statistics.median(times) * 1e3, 2),
        "step_ms_best": round(min(times) * 1e3, 2),
    }
    print(table)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
