"""Engine steps on CPU at 1 and 4 concurrent streams: SmolLM2-135M, every step timed.

Four concurrent requests (or one), 128-token prompts, 64 greedy tokens each, through
``Engine.generate`` in threads (fp16 storage, or ``--quantize``); ``runner.execute`` is
wrapped to time each engine step, and the steps that only decode, by their row count. Reports
wall time, time inside the runner, steps and tokens per second for each, alternating 1 and 4
streams ``--rounds`` times. Shows where a batched step's time goes (runner vs the engine's own
per-token work), and the 4-stream / 1-stream throughput ratio round by round.

    .venv/bin/python perf/engine_steps_cpu.py --out perf/results/cpu_engine_steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fermi  # noqa: I001 (first: its OMP_WAIT_POLICY default applies before torch loads)
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    engine = fermi.load(
        "smollm2-135m", device="cpu", max_batch=4, max_seq_len=512, quantize=args.quantize
    )
    runner = engine.runner
    inside = {"s": 0.0, "steps": 0, "decode_only": {}}
    execute = runner.execute

    def timed(batch):
        started = time.perf_counter()
        out = execute(batch)
        seconds = time.perf_counter() - started
        inside["s"] += seconds
        inside["steps"] += 1
        if batch.prefill is None and batch.decode is not None:  # decode rows only
            inside["decode_only"].setdefault(len(batch.decode.slots), []).append(seconds)
        return out

    runner.execute = timed
    kw = {"max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}

    def run(streams: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(100, 40000, (128,), generator=g).tolist() for _ in range(streams)]
        threads = [
            threading.Thread(target=lambda p=p: engine.generate(prompt_token_ids=p, **kw))
            for p in prompts
        ]
        inside.update(s=0.0, steps=0, decode_only={})
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        return {
            "wall_s": round(wall, 3),
            "in_runner_s": round(inside["s"], 3),
            "steps": inside["steps"],
            "ms_per_step": round(1e3 * inside["s"] / inside["steps"], 1),
            "tok_s_incl_prefill": round(streams * args.new_tokens / wall, 1),
            # steps with decode rows only, by row count: median ms (and how many)
            "decode_only_steps_ms": {
                rows: [round(1e3 * statistics.median(v), 2), len(v)]
                for rows, v in sorted(inside["decode_only"].items())
            },
        }

    run(1, 0), run(4, 0)  # warm-up
    rounds = []
    for r in range(args.rounds):
        one, four = run(1, 10 + r), run(4, 100 + r)
        ratio = round(four["tok_s_incl_prefill"] / one["tok_s_incl_prefill"], 2)
        rounds.append({"1 stream": one, "4 streams": four, "ratio": ratio})
        print(json.dumps(rounds[-1]), flush=True)
    engine.close()
    result = {
        "command": " ".join(sys.argv),
        "quantize": args.quantize,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_after": os.getloadavg(),
        "rounds": rounds,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
