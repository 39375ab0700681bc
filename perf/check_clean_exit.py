"""Scripts that end without ``Engine.close()``: how many of N runs exit 0.

Two scripts (tests/test_clean_exit.py has them): one ends right after a generation, one
while a generation still runs on a daemon thread. Each runs ``--runs`` times on the torch
engine (a tiny random checkpoint) and on an ONNX export of it. ``--code`` points the
scripts at another checkout (its ``fermi`` package) to count the aborts of the code
before the fix.

    PYTHONPATH=$PWD .venv/bin/python perf/check_clean_exit.py --runs 20 \\
        --out perf/results/clean_exit.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose fermi runs")
    parser.add_argument("--skip-onnx", action="store_true", help="torch engine only")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from tests.test_clean_exit import AFTER_GENERATE, DURING_GENERATE
    from tests.tiny import write_checkpoint

    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code": str(args.code),
        "runs": args.runs,
        "exit_codes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = {"torch": write_checkpoint(Path(tmp) / "ckpt", seed=1)}
        if not args.skip_onnx:
            from export.build import ExportOptions, export_model

            options = ExportOptions(
                model=str(models["torch"]),
                target="onnx",
                out=Path(tmp) / "onnx",
                max_seq_len=128,
                verify=False,
            )
            export_model(options, progress=lambda _: None)
            models["onnx"] = options.out
        env = {**os.environ, "PYTHONPATH": str(args.code)}
        for engine, model in models.items():
            for name, script in (("after", AFTER_GENERATE), ("during", DURING_GENERATE)):
                codes: Counter[int] = Counter()
                for _ in range(args.runs):
                    res = subprocess.run(
                        [sys.executable, "-c", script, str(model)],
                        capture_output=True,
                        timeout=300,
                        cwd=args.code,
                        env=env,
                    )
                    codes[res.returncode] += 1
                key = f"{engine}, ends {name} a generation"
                results["exit_codes"][key] = {str(rc): n for rc, n in sorted(codes.items())}
                print(key, dict(codes), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
