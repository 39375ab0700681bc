"""Registers, spills and shared memory of the split decode attention kernel, compiled here
without a GPU.

``fermi.models.split_decode._partials_kernel`` is compiled by this machine's Triton for
sm_90a (the H100/H200) at the launches the op makes for Qwen3's heads (groups of 2 and 4,
128-wide, bf16) and Gemma's 256-wide heads, then ``cuobjdump --dump-resource-usage`` (the
one Triton ships) reports each build's registers a thread, local memory (spills) and
shared memory. ``--tree`` compiles another checkout's kernel (``git archive REV fermi | tar
-x -C /tmp/old``): a kernel that takes the range count at run time (``splits``, before
11e156f) is compiled with it as an ``i32`` argument, as torch passes it. The device's Triton
may compile differently; this compares kernels, it times nothing (``LOG.md`` run 66).

    PYTHONPATH=$PWD .venv/bin/python perf/regs_split_decode.py \\
        --out perf/results/regs_split_decode.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "perf"))
from sass_quant_kernels import offline_triton  # noqa: E402

# (label, query heads per KV head, head dim, (keys per block, warps, stages), ranges)
BUILDS = [
    ("Qwen3-8B heads, split (batch 1-7)", 4, 128, (64, 4, 2), 32),
    ("Qwen3-8B heads, one range, usual launch", 4, 128, (64, 4, 2), 1),
    ("Qwen3-8B heads, one-wave launch", 4, 128, (128, 8, 3), 1),
    ("Qwen3-1.7B heads, split", 2, 128, (64, 4, 2), 32),
    ("Qwen3-1.7B heads, one-wave launch", 2, 128, (128, 8, 3), 1),
    ("Gemma 256-wide heads, split", 2, 256, (32, 4, 2), 32),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", type=Path, default=ROOT, help="import fermi from this folder")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cuobjdump = offline_triton(args.tree)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fermi.models import split_decode as S

    kernel = S._partials_kernel
    run_time_count = "splits" in kernel.arg_names
    rows = []
    for label, g, d, (block, warps, stages), ranges in BUILDS:
        consts = {
            "KV_HEADS": 8, "G": g, "GP": max(16, S._pow2(g)), "D": d, "DP": max(16, S._pow2(d)),
            "BLOCK": block, "SPLIT_COUNT": ranges, "SPLIT_P2": S._pow2(ranges),
            "CHUNK": min(256, S._pow2(g * d)), "HAS_WINDOW": d > 128, "HAS_SOFTCAP": d > 128,
            "IEEE": False, "ONE_RANGE": ranges == 1,
        }  # fmt: skip
        if run_time_count:  # the count an argument; SPLIT_COUNT the merge's width
            consts["SPLIT_COUNT"] = S.SPLITS
            consts["ONE_RANGE"] = False  # (the op never set it then)
        consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
        ptrs = dict.fromkeys(("Q", "K", "V", "OUT"), "*bf16")
        ptrs |= {"POS": "*i64", "ACC": "*fp32", "M": "*fp32", "L": "*fp32", "COUNT": "*i32"}
        signature = {
            n: ptrs.get(n)
            or ("constexpr" if n in consts else "fp32" if n in ("scale", "softcap") else "i32")
            for n in kernel.arg_names
        }
        source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
        options = {"num_warps": warps, "num_stages": stages}
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
            ).stdout
        found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        row = {
            "build": label,
            "group": g,
            "head_dim": d,
            "launch": [block, warps, stages],
            "ranges": ranges,
            "range_count": "run time" if run_time_count else "compiled in",
            "registers": int(found.get("REG", -1)),
            "local_bytes": int(found.get("LOCAL", 0)),
            "stack_bytes": int(found.get("STACK", 0)),
            "shared_bytes": compiled.metadata.shared,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        result = {
            "command": " ".join(sys.argv),
            "tree": str(args.tree),
            "triton": triton.__version__,
            "target": "sm_90a",
            "builds": rows,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
