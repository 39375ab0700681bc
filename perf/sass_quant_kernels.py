"""Count the machine instructions of the row and int8/int4 GPU kernels, compiled here without a GPU.

Each kernel of ``fermi.models.gemv`` (one-row bf16, int8, int4) and
``fermi.models.quant_mm`` (few-row int8 and int4) is compiled by this machine's Triton for
sm_90a (the H100/H200) at the launch configuration the rules give Qwen3-8B's gate_up
product, with the specialisation Triton's JIT gives real arguments (16-byte aligned
pointers, sizes divisible by 16), then disassembled with the ``cuobjdump`` Triton ships.
Reports the SASS instruction count, the main loop's length (the instructions a warp
issues for each BLOCK_K columns) and so the warp instructions a weight, the most frequent
opcodes, the layout Triton chose for each load (``sizePerThread``: elements one thread
loads at once) and a digest of the SASS without its addresses (equal digests: the same
machine code). ``--pdl`` compiles the one-row kernels as launched with programmatic
dependent launch (``FERMI_PDL=1``). The device's Triton
may compile differently; this is for comparing kernels and variants, not a timing.

    PYTHONPATH=$PWD .venv/bin/python perf/sass_quant_kernels.py \
        --out perf/results/sass_quant_kernels.json
    # another tree's kernels (e.g. ``git archive REV fermi | tar -x -C /tmp/old``):
    .venv/bin/python perf/sass_quant_kernels.py --tree /tmp/old --out old.json

The module imports Triton only when CUDA is present; this script makes it believe so.
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N, K, GROUP = 24576, 4096, 32  # Qwen3-8B's gate_up product


def offline_triton(tree: Path) -> str:
    """Make ``tree``'s fermi importable with its Triton kernels on a machine without a GPU
    (fermi imports Triton only when CUDA is present: this makes torch say it is), and
    return the path of the ``cuobjdump`` this Triton ships. Call before importing fermi."""
    sys.path.insert(0, str(tree))
    import torch

    torch.cuda.is_available = lambda: True
    import triton

    tools = glob.glob(str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"))
    if not tools:
        raise SystemExit("this Triton has no cuobjdump (backends/nvidia/bin)")
    return tools[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", type=Path, default=ROOT, help="import fermi from this folder")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--pdl", action="store_true", help="the one-row kernels' PDL variant")
    args = p.parse_args()
    cuobjdump = offline_triton(args.tree)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fermi.models import gemv as G
    from fermi.models import quant_mm as QM

    row = {"X": "*bf16", "Y": "*bf16", "B": "*bf16", "NW": "*bf16", "R": "*bf16"}
    flags = {"NORM": True, "ACT": 0, "HAS_BIAS": False, "HAS_RES": False}
    few = {"X": "*bf16", "B": "*bf16", "Y": "*bf16", "M": "i32", "N": "i32", "K": "i32"}
    few |= {"stride_x": "i32", "stride_c": "i32", "stride_s": "i32", "stride_y": "i32"}
    few_flags = {"GROUP": GROUP, "BLOCK_M": 16, "HAS_BIAS": False, "IEEE": False}
    kernels = []
    bn, bk, warps, stages = G.launch_config(N, K, 2)
    kernels.append((
        "bf16 one-row", G._gemv_kernel,
        row | {"W": "*bf16", "S": "*fp32", "N": "i32", "K": "i32", "stride_w": "i32",
               "eps": "fp32"},
        flags | {"BLOCK_N": bn, "BLOCK_K": bk, "HAS_SCALE": False}, (bn, bk, warps, stages),
    ))  # fmt: skip
    bn, bk, warps, stages = G.launch_config(N, K, 1)
    kernels.append((
        "int8 one-row", G._gemv_kernel,
        row | {"W": "*i8", "S": "*fp32", "N": "i32", "K": "i32", "stride_w": "i32", "eps": "fp32"},
        flags | {"BLOCK_N": bn, "BLOCK_K": bk, "HAS_SCALE": True}, (bn, bk, warps, stages),
    ))  # fmt: skip
    bn, bk, warps, stages = G.launch_config_int4(N, K, GROUP)
    kernels.append((
        "int4 one-row", G._gemv_int4_kernel,
        row | {"C": "*u8", "SC": "*fp16", "MN": "*fp16", "N": "i32", "K": "i32",
               "stride_c": "i32", "stride_s": "i32", "eps": "fp32"},
        flags | {"GROUP": GROUP, "BLOCK_N": bn, "BLOCK_K": bk}, (bn, bk, warps, stages),
    ))  # fmt: skip
    for int4 in (False, True):
        bn, bk, warps, stages = QM.few_rows_config(N, K, int4, GROUP)
        codes = {"C": "*u8", "SC": "*fp16", "MN": "*fp16"} if int4 else {
            "C": "*i8", "SC": "*fp32", "MN": "*fp32"}  # fmt: skip
        kernels.append((
            f"{'int4' if int4 else 'int8'} few-row", QM._few_rows_kernel, few | codes,
            few_flags | {"INT4": int4, "BLOCK_N": bn, "BLOCK_K": bk}, (bn, bk, warps, stages),
        ))  # fmt: skip

    target = GPUTarget("cuda", 90, 32)
    results = []
    for name, fn, types, constants, (bn, bk, warps, stages) in kernels:
        names = fn.arg_names
        if "PDL" in names:  # (a tree from before the PDL variant has no such argument)
            constants = constants | {"PDL": args.pdl}
        signature = {a: types.get(a, "constexpr") for a in names}
        # What the JIT specialises for real tensors and sizes: aligned, divisible by 16.
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, a in enumerate(names)
            if signature[a].startswith("*") or (signature[a] == "i32" and a != "M")
        }
        src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        compiled = triton.compile(
            src, target=target, options={"num_warps": warps, "num_stages": stages}
        )
        cubin = Path("/tmp") / f"fermi-sass-{name.replace(' ', '-')}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run(
            [cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        # (address, opcode), predicated instructions (``@P0 BRA``) included.
        code = [
            (int(at, 16), op)
            for at, op in re.findall(
                r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)", sass, re.M
            )
        ]
        ops = [op for _, op in code]
        body = re.sub(
            r"/\*[0-9a-f]{4,}\*/|/\* 0x[0-9a-f]+ \*/", "", sass.split("Function :", 1)[-1]
        )
        # The main loop: the longest backward branch (Triton's K loop); its body runs once
        # per BLOCK_K columns, over BLOCK_N x BLOCK_K weights shared by the warps.
        targets = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?BRA 0x([0-9a-f]+)", sass)
        loop = max(
            (
                (int(at, 16) - int(to, 16)) // 16 + 1
                for at, to in targets
                if int(to, 16) < int(at, 16)
            ),
            default=0,
        )
        ttgir = compiled.asm["ttgir"]
        layouts = dict(
            re.findall(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = (\[[^\]]*\])", ttgir, re.M)
        )
        loads = [
            f"{shape}: {layouts.get(lay, lay)} a thread"
            for shape, lay in re.findall(
                r"tt\.load [^:]*: tensor<([^,]+)x!tt\.ptr<[^>]+>, (#\w+)>", ttgir
            )
        ]
        results.append({
            "kernel": name,
            "config": {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages},
            "sass_instructions": len(ops),
            "loop_instructions": loop,
            "weights_per_warp_per_iteration": bn * bk // warps,
            "warp_instructions_per_weight": round(loop / (bn * bk / warps), 3),
            "top_opcodes": dict(collections.Counter(ops).most_common(12)),
            "sass_digest": hashlib.sha256(body.encode()).hexdigest()[:16],
            "griddepcontrol": sorted({op for op in ops if op in ("ACQBULK", "PREEXIT")}),
            "loads": loads,
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        out = {
            "command": " ".join(sys.argv),
            "tree": str(args.tree),
            "triton": triton.__version__,
            "target": "sm_90a",
            "pdl": args.pdl,
            "shape": {"n": N, "k": K, "group": GROUP},
            "kernels": results,
        }
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
