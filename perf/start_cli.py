"""A second start of ``fermi chat`` to its first reply token (issue 20's target: ≤ 3 s).

Runs ``fermi chat --model smollm2-135m --device cpu --max-tokens 8`` ``--runs`` times with
"Hi" piped in (after one unrecorded run that warms the page cache and any cache on disk)
and times, from the process's start: the banner line (the model is loaded), the first
byte of the reply (the first token), and the exit. With ``--before TREE`` (a checkout of
an older commit, e.g. ``git worktree add /tmp/before HEAD~3``) runs alternate between that
tree (put first on ``PYTHONPATH``) and this one, so that both see the same machine.

    .venv/bin/python perf/start_cli.py --out perf/results/cpu_start_chat.json
    .venv/bin/python perf/start_cli.py --before /tmp/before --out /tmp/ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one_start(cmd: list[str], tree: str | None = None) -> dict:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"Hi\n")
    proc.stdin.close()
    banner = first = None
    while first is None:
        byte = os.read(proc.stdout.fileno(), 1)
        if not byte:
            break
        if banner is None:
            if byte == b"\n":
                banner = time.perf_counter() - started
        else:
            first = time.perf_counter() - started
    rest = proc.stdout.read()
    proc.wait()
    if banner is None or first is None or proc.returncode != 0:
        raise RuntimeError(f"fermi chat failed (rc {proc.returncode}): {rest[-400:]!r}")
    return {
        "banner_s": round(banner, 3),
        "first_token_s": round(first, 3),
        "exit_s": round(time.perf_counter() - started, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--before", default=None, help="an older tree to alternate with")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    fermi = str(Path(sys.executable).parent / "fermi")
    cmd = [fermi, "chat", "--model", args.model, "--device", "cpu", "--max-tokens", "8"]
    trees: dict[str, str | None] = {"this tree": None}
    if args.before is not None:
        trees = {"before": args.before, **trees}
    for tree in trees.values():
        one_start(cmd, tree)  # warm the page cache
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            runs[name].append(one_start(cmd, tree))
            print(name, json.dumps(runs[name][-1]), flush=True)
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_after": os.getloadavg(),
        "chat_command": " ".join(cmd[1:]),
    }
    for name, rows in runs.items():
        firsts = [r["first_token_s"] for r in rows]
        result[name] = {
            "first_token_median_s": statistics.median(firsts),
            "first_token_range_s": [min(firsts), max(firsts)],
            "banner_median_s": statistics.median(r["banner_s"] for r in rows),
            "runs": rows,
        }
        print(name, {k: v for k, v in result[name].items() if k != "runs"})
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
