"""What a lone sequence in a high cache slot costs, and what moving it down costs.

A decode step of one sequence in slot 0 reads its cache as a view; in slot 3 the eager runner
gathers the slot's rows (on a GPU the CUDA-graph runner runs the batch-4 bucket instead). The
scheduler therefore moves a running sequence into a freed lower slot between steps
(``SlotTable.compact``). This times, on the runner directly, a decode step at a given context
in slot 0 and in slot 3, and one ``move_slot`` of that context.

Run from the repository root::

    flock /tmp/fermi-bench.lock .venv/bin/python perf/micro_slot_move.py \\
        --model smollm2-135m --context 512 --out perf/results/cpu_slot_move.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fermi


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("FERMI_THREADS", torch.get_num_threads())))
    engine = fermi.load(args.model, max_batch=args.max_batch, max_seq_len=args.context + 64)
    runner = engine.runner
    high = args.max_batch - 1
    tokens = torch.randint(0, runner.capabilities.vocab_size, (args.context,)).tolist()
    chunk = runner.capabilities.prefill_chunk
    for slot in (0, high):  # both slots hold the same context
        for begin in range(0, args.context, chunk):
            runner.prefill(slot, tokens[begin : begin + chunk], begin)

    def step(slot: int):
        return lambda: runner.decode([slot], [tokens[-1]], [args.context])

    rounds = {"slot_0_ms": [], f"slot_{high}_ms": [], "move_ms": []}
    for _ in range(args.rounds):  # interleaved, so machine load hits each alike
        rounds["slot_0_ms"].append(statistics.median(timed(step(0), args.repeats)))
        rounds[f"slot_{high}_ms"].append(statistics.median(timed(step(high), args.repeats)))
        move = lambda: runner.move_slot(high, 1, args.context)  # noqa: E731
        rounds["move_ms"].append(statistics.median(timed(move, args.repeats)))
    engine.close()

    cfg = runner.model.cfg
    itemsize = runner.model.dtype.itemsize
    per_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize
    result = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "model": args.model,
        "context": args.context,
        "cache_bytes_per_slot_context": per_position * args.context,
        "median_of_round_medians": {k: round(statistics.median(v), 3) for k, v in rounds.items()},
        "range": {k: [round(min(v), 3), round(max(v), 3)] for k, v in rounds.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
