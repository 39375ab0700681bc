"""The split-KV decode attention kernel's launch choices, swept on the GPU (issue 17).

Run 51 (`LOG.md`) left the kernel at 67 us a layer for 128 rows at context 200, 37% of the
read bandwidth. This times ``fermi.models.split_decode._partials_kernel`` launched directly
(not through the registered op) for Qwen3-1.7B's heads at several batch/context points,
over one KV cache per layer (28, as a decode step reads them, so that none is still in L2),
in a CUDA graph, for every combination of:

- ``target``: programs aimed for (ranges per (row, KV head) = ceil(target / pairs), at most
  32 and at most the key blocks), with only ranges that start before the end launched;
- ``block``: keys per inner iteration; ``warps``; ``stages`` (software pipelining).

Rows ``main``, ``split512``, ``untrimmed`` and ``old`` are the launch the registered op makes
today (``fermi.models.split_decode.launch_plan``: 32 ranges below 64 pairs, one range per
pair from there up, with the wider one-wave launch while the pairs fit one program per
multiprocessor), the launch of runs 54-59 (512 programs aimed for at every batch, only
ranges that hold keys), the launch of run 51 (every counted range, empty ones too) and the
launch before run 51 (32 ranges always). Every variant's range count is compiled into the
kernel, as the op compiles it since run 66 (one range: no merge code).
Each variant's output is
checked against attention in float32 before it is timed. Reports us per layer, the bytes of
K and V read (at the row's positions) per second, and the best variant per point.

    PYTHONPATH=$PWD python3 perf/micro_split_decode.py --out $OUT/split_sweep.json
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python perf/micro_split_decode.py --check-only  # CPU
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (rows, context, KV bucket): the 128-row serving step of run 51, a mid batch, batch 8 and
# batch 1 at long contexts.
POINTS = [(128, 200, 256), (128, 1000, 1024), (32, 500, 512), (8, 2100, 3072), (1, 2100, 3072)]
SWEEP = list(itertools.product((64, 256, 512, 1024, 2048), (32, 64, 128), (4, 8), (2, 3, 4)))


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def sweep_plan(pairs: int, length: int, block: int, target: int, trim: bool):
    """(ranges launched, keys per range); ``trim``: only ranges that start before the end."""
    count = max(1, min(32, cdiv(target, pairs), cdiv(length, block)))
    split_len = cdiv(cdiv(length, count), block) * block
    return (cdiv(length, split_len) if trim else count), split_len


def run_kernel(q, keys, values, positions, counters, plan, block, warps, stages, out):
    import torch

    from fermi.models import split_decode as S

    ranges, split_len = plan
    h, d = q.shape[1], q.shape[3]
    pairs = q.shape[0] * keys.shape[1]
    g = h // keys.shape[1]
    partials = (
        torch.empty((pairs * ranges, g, d), dtype=torch.float32, device=q.device),
        torch.empty((pairs * ranges, g), dtype=torch.float32, device=q.device),
        torch.empty((pairs * ranges, g), dtype=torch.float32, device=q.device),
    )
    launch = (block, warps, stages)
    S._launch(S._partials_kernel, (pairs, ranges), q, keys, values, positions, counters, out,
              partials, split_len, 0, d**-0.5, 0.0, launch)  # fmt: skip


def op_launch(pairs: int, bucket: int, d: int, element_size: int, device):
    """(plan, block, warps, stages) the registered op launches for this shape (concrete
    shapes make one launch)."""
    from fermi.models import split_decode as S

    ((_, count, split_len, launch),) = S.launch_plan(
        pairs, bucket, d, element_size, S.multiprocessors(device)
    )
    return ((count, split_len), *launch)


def every_layer(caches, q, positions, counters, plan, block, warps, stages, out) -> None:
    for c in caches:
        run_kernel(q, c[0], c[1], positions, counters, plan, block, warps, stages, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--heads", type=int, nargs=3, default=(16, 8, 128), help="q heads, KV, dim")
    p.add_argument("--check-only", action="store_true", help="small shapes, no timing (CPU)")
    p.add_argument("--only", nargs="+", default=None, help="these variants only (e.g. main old)")
    p.add_argument(
        "--points", nargs="+", default=None, metavar="ROWS,CONTEXT,BUCKET", help="instead of POINTS"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch
    from micro_gemv import time_graph

    from tests.test_split_decode import reference

    cuda = torch.cuda.is_available() and not args.check_only
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    h, kv_heads, d = args.heads
    points, sweep, layers = POINTS, SWEEP, args.layers
    if args.points:
        points = [tuple(int(x) for x in point.split(",")) for point in args.points]
    if not cuda:  # Triton's interpreter: the launch logic and results only
        points, layers = [(3, 70, 96), (1, 150, 160)], 1
        sweep = list(itertools.product((64, 512), (32, 64), (4,), (2,)))
    result = {"command": " ".join(sys.argv), "device": device, "points": []}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
    started = time.time()
    for rows, context, bucket in points:
        gen = torch.Generator(device=device).manual_seed(rows + context)
        caches = [
            torch.randn(2, rows, kv_heads, bucket, d, generator=gen, device=device).to(dtype)
            for _ in range(layers)
        ]
        q = torch.randn(rows, h, 1, d, generator=gen, device=device).to(dtype)
        positions = torch.full((rows, 1), context - 1, device=device)
        counters = torch.zeros(rows * kv_heads, dtype=torch.int32, device=device)
        out = torch.empty_like(q)
        want = reference(q, caches[0][0], caches[0][1], positions, None, d**-0.5, None)
        pairs = rows * kv_heads
        # Bytes a layer must read: K and V of every row up to its position.
        floor = 2 * rows * kv_heads * context * d * caches[0].element_size()
        old_len = cdiv(cdiv(bucket, 32), 64) * 64  # before run 51: 32 ranges always
        variants = {
            "old": ((32, old_len), 64, 4, 2),
            "main": op_launch(pairs, bucket, d, caches[0].element_size(), device),
            "split512": (sweep_plan(pairs, bucket, 64, 512, trim=True), 64, 4, 2),
            "untrimmed": (sweep_plan(pairs, bucket, 64, 512, trim=False), 64, 4, 2),
        }
        for t, b, w, s in sweep:
            variants[f"t{t}_b{b}_w{w}_s{s}"] = (sweep_plan(pairs, bucket, b, t, True), b, w, s)
        if args.only:
            variants = {k: v for k, v in variants.items() if k in args.only}
        rows_out = []
        for name, (plan, block, warps, stages) in variants.items():
            entry = {"variant": name, "ranges": plan[0], "keys_per_range": plan[1]}
            try:
                run_kernel(q, caches[0][0], caches[0][1], positions, counters, plan, block,
                           warps, stages, out)  # fmt: skip
                err = (out.float() - want).abs().max().item()
                entry["max_err"] = err
                if err > (2e-2 if dtype == torch.bfloat16 else 1e-4) or counters.any():
                    entry["error"] = "wrong result"
                elif cuda:
                    step = functools.partial(
                        every_layer, caches, q, positions, counters, plan, block, warps, stages,
                        out,
                    )  # fmt: skip
                    us = time_graph(step, layers)
                    entry["us_per_layer"] = round(us, 2)
                    entry["gb_s"] = round(floor / us / 1e3, 1)
            except Exception as exc:  # a configuration out of shared memory, for one
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            rows_out.append(entry)
        timed = [e for e in rows_out if "us_per_layer" in e]
        point = {"rows": rows, "context": context, "kv_bucket": bucket, "variants": rows_out}
        if timed:
            best = min(timed, key=lambda e: e["us_per_layer"])
            point["best"] = best
            point["main"] = next((e for e in rows_out if e["variant"] == "main"), None)
            print(json.dumps({k: point[k] for k in ("rows", "context", "best", "main")}))
        else:
            bad = [e for e in rows_out if "error" in e]
            print(rows, context, "checked", len(rows_out), "variants;", len(bad), "failed", bad)
            if bad:
                raise SystemExit(1)
        result["points"].append(point)
    result["seconds"] = round(time.time() - started, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
