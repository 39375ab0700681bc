"""SmolLM2-135M's eager decode step on CPU by intra-op thread count and OpenMP wait policy.

Each policy needs its own process: OpenMP reads it once, when torch loads it. Policies
(``--policies``): ``unset`` (libgomp's default: spin a while at a barrier, then sleep),
``PASSIVE``, ``ACTIVE`` (spin until released), ``spin:N`` (unset, with ``GOMP_SPINCOUNT``
N). Processes alternate (``--rounds`` of each); inside one, thread counts alternate step by
step (``torch.set_num_threads``). The step is ``Decoder.forward`` (fp16 storage; in fermi's
kernels where they build, else FBGEMM's packs and torch's ops) at 1 and 4 rows, position
130. ``--neighbour`` runs a busy loop in another process meanwhile
(a core that other work holds, as on a laptop or beside a server's other threads).

    .venv/bin/python perf/threads_cpu.py --out perf/results/cpu_threads.json
    .venv/bin/python perf/threads_cpu.py --policies unset PASSIVE spin:10000 --neighbour \
        --out perf/results/cpu_threads_neighbour.json
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

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from fermi.aliases import alias_path
from fermi.gguf import load_gguf
model = load_gguf(alias_path("smollm2-135m"), torch.device("cpu"), None).model
prefill = int(sys.argv[4])
model.setup_cache(4, max(256, prefill + 1))
sys.path.insert(0, sys.argv[1] + "/perf")
from bench_cpu_quant import fill_caches
fill_caches(model)  # (unwritten cache pages are the zero page: run 73)
native = model.use_native_rows()  # decode steps in fermi's kernels, where they build
counts = [int(c) for c in sys.argv[2].split(",")]
times = {f"{t} threads, {r} rows": [] for t in counts for r in (1, 4)}
times.update({f"{t} threads, prefill {prefill}": [] for t in counts if prefill})
with torch.inference_mode():
    for step in range(int(sys.argv[3])):
        for t in counts:
            torch.set_num_threads(t)
            for r in (1, 4):
                tokens, positions = torch.full((r, 1), 5), torch.full((r, 1), 130)
                started = time.perf_counter()
                model(tokens, positions, torch.arange(r), 131, rows_are_slots=True)
                times[f"{t} threads, {r} rows"].append(1e3 * (time.perf_counter() - started))
            if prefill and step % 5 == 0:  # (a prefill is ~20 decode steps)
                tokens = torch.arange(100, 100 + prefill)[None]
                started = time.perf_counter()
                model(tokens, torch.arange(prefill)[None], torch.tensor([0]), prefill)
                times[f"{t} threads, prefill {prefill}"].append(
                    1e3 * (time.perf_counter() - started)
                )
print(json.dumps({"native": native, "times": times}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", default=f"1,{os.cpu_count()}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--policies", nargs="+", default=["unset", "PASSIVE"])
    p.add_argument("--prefill", type=int, default=0, help="also time a prefill of N tokens")
    p.add_argument("--neighbour", action="store_true", help="a busy loop in another process")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    merged: dict[str, dict[str, list[float]]] = {}
    load = [os.getloadavg()]
    neighbour = None
    if args.neighbour:
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(args.rounds):
            for policy in args.policies:
                run_policy(policy, args, merged)
                load.append(os.getloadavg())
    finally:
        if neighbour is not None:
            neighbour.kill()
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": "shared machine; load averages after each process below",
        "neighbour": "a Python busy loop in another process" if args.neighbour else None,
        "load_averages": load,
        "step_ms": {
            policy: {
                key: {
                    "min": round(min(v), 1),
                    "median": round(statistics.median(v), 1),
                    "p90": round(statistics.quantiles(v, n=10)[-1] if len(v) > 1 else v[0], 1),
                }
                for key, v in by_key.items()
            }
            for policy, by_key in merged.items()
            if not isinstance(by_key, set)
        },
        "decode steps in fermi's kernels": sorted(
            merged.get("decode steps in fermi's kernels", [])
        ),
    }
    print(json.dumps(result["step_ms"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def run_policy(policy: str, args: argparse.Namespace, merged: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy in ("PASSIVE", "ACTIVE"):
        env["OMP_WAIT_POLICY"] = policy
    elif policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    elif policy != "unset":
        raise SystemExit(f"unknown policy {policy!r}")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), args.threads, str(args.steps), str(args.prefill)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    merged.setdefault("decode steps in fermi's kernels", set()).add(child["native"])
    for key, values in child["times"].items():
        merged.setdefault(policy, {}).setdefault(key, []).extend(values[1:])


if __name__ == "__main__":
    main()
