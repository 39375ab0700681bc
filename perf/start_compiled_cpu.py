"""A fresh process's start with the compiled CPU runner (``torch-compile``): cold, then warm.

Issue 17's start target asks how fast a compiled runner can start once its compiles are
cached. On CPU the same runner code (``CudaGraphRunner`` without graphs) re-traces its
frames with Dynamo on every start, as on the GPU. This times, in fresh interpreters with
their own caches, ``import fermi``, ``fermi.load(..., runner="torch-compile",
warmup="first")`` and a first 8-token reply: once with empty caches, then ``--warm`` times
with what the first left. With ``FERMI_AOT=1`` in the environment the runner's steps are
AOTInductor packages (``fermi.runners.packaged``): the cold start builds them, the warm
ones load them. ``--precompile`` also sets Dynamo's ``caching_precompile``
(its frames saved beside Inductor's; experimental) in every start.

    .venv/bin/python perf/start_compiled_cpu.py MODEL_FOLDER --out perf/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(model: str, precompile: bool) -> None:
    t0 = time.perf_counter()
    import torch

    if precompile:
        torch._dynamo.config.caching_precompile = True
    import fermi

    t1 = time.perf_counter()
    engine = fermi.load(model, runner="torch-compile", max_batch=2, max_seq_len=256, warmup="first")
    t2 = time.perf_counter()
    out = engine.generate(prompt="hello there", max_tokens=8, temperature=0.0)
    t3 = time.perf_counter()
    # Then decode speed: one request of 64 tokens, after the idle warm-up is done.
    deadline = time.perf_counter() + 600
    while engine.runner.startup.complete_s is None and time.perf_counter() < deadline:
        time.sleep(0.05)
    t4 = time.perf_counter()
    more = engine.generate(prompt="hello there", max_tokens=64, temperature=0.0, ignore_eos=True)
    decode_s = time.perf_counter() - t4
    print(json.dumps({
        "import_s": t1 - t0, "load_and_warmup_s": t2 - t1, "first_reply_s": t3 - t2,
        "total_s": t3 - t0, "token_ids": list(out.token_ids),
        "decode_64_tok_s": len(more.token_ids) / decode_s,
    }))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model")
    p.add_argument("--warm", type=int, default=2)
    p.add_argument("--precompile", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        child(args.model, args.precompile)
        return
    caches = Path(tempfile.mkdtemp(prefix="fermi-start-"))
    env = {
        **os.environ,
        "FERMI_COMPILE_CACHE": str(caches / "fermi"),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, __file__, args.model, "--child"]
    command += ["--precompile"] if args.precompile else []
    starts = []
    for i in range(1 + args.warm):
        began = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        row = {"start": "cold" if i == 0 else "warm", "wall_s": time.perf_counter() - began}
        if proc.returncode == 0:
            row |= json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            row["error"] = lines[-1] if lines else f"exit status {proc.returncode}"
        print(json.dumps(row), flush=True)
        starts.append(row)
    result = {
        "command": " ".join(sys.argv),
        "torch": __import__("torch").__version__,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "precompile": args.precompile,
        "FERMI_AOT": os.environ.get("FERMI_AOT", "0"),
        "starts": starts,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
