"""Where a fresh process's start on the GPU goes, graph by graph (issue 17's start target).

Each start runs in a fresh interpreter with its own compile caches: the first (cold) with
empty caches, the second (warm) with what the first left. The child times import, weights,
each graph's first run (its rehearsal, which compiles when a new frame is met, and its
capture) and the first token through the engine, and prints them as JSON.

    PYTHONPATH=$PWD python3 perf/start_phases.py --model Qwen3-1.7B --out start.json
    PYTHONPATH=$PWD python3 perf/start_phases.py --model Qwen3-1.7B --warmup first --variants plain

``--variants aot`` starts with ``FERMI_AOT=1`` (the steps as AOTInductor packages: the cold
start builds them into the compile cache, the warm one loads them). ``--cache DIR`` keeps
the caches in DIR (else a temporary folder per variant) and ``--phases`` picks the starts,
so that a cold start and a warm one may run in separate device calls.

``--variants precompile`` also sets ``torch._dynamo.config.caching_precompile`` (Dynamo's
own frames saved beside Inductor's, an experimental torch feature) in both starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(model_name: str, variant: str, warmup: str, max_batch: int, max_seq_len: int) -> None:
    t0 = time.perf_counter()
    import torch

    torch_imported = time.perf_counter()

    if variant == "precompile":
        torch._dynamo.config.caching_precompile = True
    from bench_decode import our_decoder, prompt_ids, wordlevel_tokenizer

    from fermi.engine.api import Engine
    from fermi.loading import GenerationDefaults
    from fermi.models.shapes import config
    from fermi.runners import torch_cuda
    from fermi.runners.torch_cuda import CudaGraphRunner, _compiled_frames

    imported = time.perf_counter()
    logging.basicConfig(format="%(relativeCreated)8.0f ms %(name)s %(message)s")
    logging.getLogger("fermi").setLevel(logging.INFO)
    cfg = config(model_name)
    model = our_decoder(cfg)
    torch.cuda.synchronize()
    built = time.perf_counter()

    graphs: list[dict] = []
    rehearsal = [0.0]
    run, rehearse = CudaGraphRunner._run, CudaGraphRunner._rehearse

    def timed_rehearse(self, body):
        start = time.perf_counter()
        rehearse(self, body)
        torch.cuda.synchronize()
        rehearsal[0] = time.perf_counter() - start

    def timed_run(self, key, body):
        if key in self._graphs or not self.use_graphs:
            return run(self, key, body)
        frames, start = _compiled_frames(), time.perf_counter()
        out = run(self, key, body)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        graphs.append(
            {
                "key": [str(k) for k in key],
                "rehearse_s": round(rehearsal[0], 4),
                "capture_s": round(total - rehearsal[0], 4),
                "compiled_frames": _compiled_frames() - frames,
                "at_s": round(time.perf_counter() - t0, 3),
            }
        )
        return out

    CudaGraphRunner._run, CudaGraphRunner._rehearse = timed_run, timed_rehearse
    kwargs = {} if warmup == "full" else {"warmup": warmup}
    runner = CudaGraphRunner(model, max_batch, max_seq_len, prefill_chunk=2048, **kwargs)
    warmed = time.perf_counter()
    engine = Engine(
        runner, wordlevel_tokenizer(cfg["vocab_size"]), GenerationDefaults(), model_name="s"
    )
    out = engine.generate(prompt_token_ids=prompt_ids(128, cfg["vocab_size"], 1), max_tokens=1)
    torch.cuda.synchronize()
    first = time.perf_counter()
    # The warm-up left for idle time runs on the engine thread now: wait for it, so that
    # the compile cache the next start loads is the whole one.
    deadline = first + 900
    while runner.startup.complete_s is None and time.perf_counter() < deadline:
        time.sleep(0.05)
    complete = time.perf_counter()
    engine.close()
    stats = runner.startup
    compiles = [g for g in graphs if g["compiled_frames"]]
    plain = [g for g in graphs if not g["compiled_frames"]]
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "import_s": imported - t0,
                "import_torch_s": torch_imported - t0,  # the rest: fermi, Triton, Inductor
                "build_weights_s": built - imported,
                "warmup_s": warmed - built,
                "first_token_s": first - warmed,
                "to_first_token_s": first - t0,
                "to_complete_warmup_s": complete - t0,
                "tokens": len(out.token_ids),
                "cache_hit": stats.cache_hit,
                "startup": {k: v for k, v in vars(stats).items() if k != "notes"},
                "notes": stats.notes,
                "graphs": len(graphs),
                "compiling_graphs": len(compiles),
                "compiling_rehearse_s": sum(g["rehearse_s"] for g in compiles),
                "other_rehearse_s": sum(g["rehearse_s"] for g in plain),
                "capture_s": sum(g["capture_s"] for g in graphs),
                "frames": _compiled_frames(),
                "per_graph": graphs,
                "module": torch_cuda.__file__,
            }
        )
    )


def start(args: argparse.Namespace, variant: str, cache: Path) -> dict:
    env = {
        **os.environ,
        "FERMI_AOT": "1" if variant == "aot" else "0",
        "FERMI_COMPILE_CACHE": str(cache / "fermi"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
    }
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model]
    cmd += ["--warmup", args.warmup, "--max-batch", str(args.max_batch)]
    cmd += ["--max-seq-len", str(args.max_seq_len)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, check=False, timeout=args.timeout
        )
    except subprocess.TimeoutExpired as exc:  # what it logged so far says how far it got
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return {"error": f"timed out after {args.timeout} s\n{err[-3000:]}", "wall_s": args.timeout}
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "wall_s": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen3-1.7B")
    p.add_argument(
        "--variants", nargs="+", default=["plain"], choices=["plain", "precompile", "aot"]
    )
    p.add_argument("--phases", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    p.add_argument("--cache", default=None, help="caches here (per variant), not in a temp dir")
    p.add_argument("--warmup", default="full", help="the runner's warmup argument")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds a start may take")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phases[0] == "warm" and not args.cache:
        p.error("a warm start first needs the caches a cold one left: give --cache DIR")
    if args.child:
        child(args.model, args.child, args.warmup, args.max_batch, args.max_seq_len)
        return
    import torch

    result = {
        "command": " ".join(["perf/start_phases.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": args.model,
        "starts": {},
    }
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(args.cache) / variant if args.cache else Path(tmp)
            for phase in args.phases:
                r = start(args, variant, cache)
                result["starts"][f"{variant}_{phase}"] = r
                brief = {k: r.get(k) for k in ("to_first_token_s", "warmup_s", "graphs")}
                print(variant, phase, brief, r.get("error", "")[-800:], flush=True)
                for k in ("compiling_rehearse_s", "other_rehearse_s", "capture_s"):
                    print(f"  {k}: {r.get(k)}", flush=True)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
