"""Where the engine thread's time goes per decode step, free and under a JSON schema (issue 15).

The constrained rate at batch 8 is set by the host (``perf/LOG.md`` runs 19-20): the forward
pass of step n+1 runs on the device while the engine thread reads step n, advances each
row (detokenising, stop checks, the grammar matcher), fills step n+1's masks and queues its
sampling. Whatever of that outlasts the forward pass leaves the device idle. This wraps the
engine's phases with timers and reports each one's mean per step:

- ``schedule``: building the next ``Batch``;
- ``execute``: the runner's step (on a GPU: launching the forward graph; on a CPU: the
  whole forward pass, which makes the CPU's ``execute`` figure useless for this question);
- ``wait``: blocking on the step before (on a GPU, the device's time the host did not fill);
- ``update_rest``: reading and advancing the rows, without ``wait``;
- ``masks``: ``fill_masks`` (llguidance, one row after another);
- ``finish_rest``: the masked step's sampling queued, without ``masks``.

``host`` is everything but ``execute`` (CPU) or everything but ``wait`` (GPU).

``--closed-loop C`` runs free requests the way a server under load sees them (issue 17's
serving at 128): C streams at once, each followed by a new request the moment it ends, so
requests keep arriving and leaving. It also counts, per step, the steps that carry a prefill
chunk, the slot moves, and the steps queued without the previous step's ids (the engine had
to read the step in flight first: no overlap of host and device for that step).

    .venv/bin/python perf/profile_engine_host.py --device cpu --tiktoken .whl/qwen.tiktoken \
        --out perf/results/cpu_engine_host.json
    PYTHONPATH=$PWD python perf/profile_engine_host.py --device cuda --shape Qwen3-1.7B \
        --tiktoken .whl/qwen.tiktoken --out perf/results/h200_engine_host.json
    PYTHONPATH=$PWD python perf/profile_engine_host.py --device cuda --shape Qwen3-1.7B \
        --batch 128 --closed-loop 128 --out perf/results/h200_engine_host_c128.json

On the CPU the model is a two-layer random Qwen3 with the real vocabulary's size (151,936
ids) so that the host's per-row work is that of a real Qwen3 reply, and the forward pass is
small; on the GPU it is ``--shape`` at its real size, as in ``bench_constrained.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_constrained import build, gpu_engine, synthetic_bpe, tiktoken_bpe, window_rate


def tiny_cpu_engine(tiktoken: str | None, max_batch: int, max_seq_len: int):
    import torch

    from fermi.engine.api import Engine
    from fermi.loading import GenerationDefaults
    from fermi.models.decoder import Decoder
    from fermi.models.registry import adapter_for
    from fermi.models.shapes import config
    from fermi.runners.torch_eager import TorchRunner

    cfg = config("Qwen3-0.6B")
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    cfg.update(num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    if not tiktoken:
        cfg.update(vocab_size=8192)
    torch.manual_seed(0)
    model = Decoder(adapter_for(cfg).to_config(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    runner = TorchRunner(model.eval().requires_grad_(False), max_batch, max_seq_len)
    tok = tiktoken_bpe(tiktoken, cfg["vocab_size"]) if tiktoken else synthetic_bpe(8192)
    defaults = GenerationDefaults(eos_token_ids=(tok.eos_token_id,))
    engine = Engine(runner, tok, defaults, model_name="qwen3-tiny")
    return engine, {"shape": "Qwen3 vocabulary, 2 layers of 64", "tokenizer_ids": tok.vocab_size}


class Timers:
    """Wraps the engine's phases; ``calls[name]`` holds each call's seconds."""

    def __init__(self, engine) -> None:
        from fermi.runners.base import StepOutput

        self.calls: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)
        sched, runner = engine._core.scheduler, engine.runner
        runner.execute = self._counted(runner.execute)
        sched.schedule = self._timed("schedule", sched.schedule)
        sched.update = self._timed("update", sched.update)
        sched.fill_masks = self._timed("masks", sched.fill_masks)
        runner.execute = self._timed("execute", runner.execute)
        StepOutput.wait = self._timed("wait", StepOutput.wait)
        StepOutput.finish = self._timed("finish", StepOutput.finish)

    def _timed(self, name: str, fn):
        calls = self.calls

        def timed(*a, **kw):
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                calls[name].append(time.perf_counter() - started)

        return timed

    def _counted(self, execute):
        counts = self.counts

        def counted(batch):
            counts["executed"] += 1
            counts["prefill"] += batch.prefill is not None
            counts["moves"] += len(batch.moves)
            counts["admitted"] += len(batch.admitted)
            if batch.decode is not None:
                counts["decode"] += 1
                counts["decode_rows"] += len(batch.decode.slots)
                counts["ids_from_host"] += batch.decode.token_ids is not None
            return execute(batch)

        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.counts.clear()

    def per_step_us(self, device: str) -> dict:
        """Each phase's mean microseconds per decode step (steps = ``update`` calls)."""
        steps = len(self.calls["update"])
        total = {k: sum(v) for k, v in self.calls.items()}
        # update() calls wait(); finish() (GPU) or execute() (CPU) calls fill_masks()
        masks, finish = total.get("masks", 0.0), total.get("finish", 0.0)
        # The GPU runner fills a step's masks in finish(); the base runner (CPU) in execute().
        in_finish = finish >= masks
        out = {
            "schedule": total.get("schedule", 0.0),
            "execute": total.get("execute", 0.0) - (0.0 if in_finish else masks),
            "wait": total.get("wait", 0.0),
            "update_rest": total.get("update", 0.0) - total.get("wait", 0.0),
            "masks": masks,
            "finish_rest": finish - masks if in_finish else finish,
        }
        us = {k: round(1e6 * v / steps, 1) for k, v in out.items()}
        skip = "execute" if device == "cpu" else "wait"
        us["host"] = round(sum(v for k, v in us.items() if k != skip), 1)
        us["steps"] = steps
        us["update_median_us"] = round(1e6 * statistics.median(self.calls["update"]), 1)
        us["counts"] = dict(self.counts)
        return us


def strict_following(scheduler) -> None:
    """The old rule (the A of an A/B): a step continues the one in flight only when its
    decode rows are exactly that step's, so any row joining or leaving makes the engine
    read the step in flight first. Not the old code exactly: the runner still copies first
    tokens and the new rule's other fallbacks still apply, which cost nothing here."""
    general = scheduler._following

    def following():
        out = general()
        last = scheduler._scheduled[-1] if scheduler._scheduled else None
        if out is None or last is None or out[0] != last.decode:
            return None
        return out

    scheduler._following = following


def closed_loop(engine, streams: int, requests: int, new_tokens: int, seed: int) -> dict:
    """``streams`` free requests at once, each replaced by the next as it ends, until
    ``requests`` have run; tokens/s and steps/s over the whole run."""
    lock = threading.Lock()
    left = list(range(requests))
    finished = threading.Semaphore(0)
    tokens = [0]

    def submit() -> None:
        with lock:
            if not left:
                return
            i = left.pop()
        req = engine.build_request(
            prompt=f"Request {seed}-{i}: write about item {i} at some length.",
            max_tokens=new_tokens, temperature=0.8, seed=seed * 100_000 + i, ignore_eos=True,
        )  # fmt: skip
        engine.submit(req, sink)

    def sink(delta) -> None:
        tokens[0] += len(delta.token_ids)
        if delta.finish_reason is not None:
            finished.release()
            submit()

    started = time.perf_counter()
    for _ in range(streams):
        submit()
    for _ in range(requests):
        finished.acquire()
    wall = time.perf_counter() - started
    return {"tok_s": tokens[0] / wall, "wall_s": wall, "tokens": tokens[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", default="Qwen3-1.7B")
    p.add_argument("--tiktoken", default=None, help="a tiktoken rank file (Qwen's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--closed-loop",
        type=int,
        default=0,
        metavar="C",
        help="free requests only: C streams, each replaced as it ends",
    )
    p.add_argument(
        "--ab",
        action="store_true",
        help="closed loop: alternate runs with the strict rule (strict_following)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not args.closed_loop and not args.tiktoken:
        p.error("the JSON-schema comparison needs --tiktoken (a real vocabulary)")

    import torch

    if args.device == "cuda":
        engine, about = gpu_engine(args.shape, args.batch, 1024, args.tiktoken)
    else:
        engine, about = tiny_cpu_engine(args.tiktoken, args.batch, 1024)
    timers = Timers(engine)
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        **about,
        "runs": [],
    }
    if args.closed_loop:
        result["closed_loop"] = args.closed_loop
        with engine:
            c = args.closed_loop
            closed_loop(engine, c, c, args.new_tokens, 99)  # warm-up: every shape met
            scheduler = engine._core.scheduler
            general = scheduler._following
            for run in range(args.runs * (2 if args.ab else 1)):
                strict = args.ab and (run % 2 == (run // 2) % 2)  # ABBA order
                scheduler._following = general
                if strict:
                    strict_following(scheduler)
                timers.reset()
                rate = closed_loop(engine, c, 3 * c, args.new_tokens, run)
                steps = timers.per_step_us(args.device)
                kind = "free, closed loop" + (", strict rule" if strict else "")
                row = {"kind": kind, **{k: round(v, 1) for k, v in rate.items()}}
                row["per_step_us"] = steps
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return
    with engine:
        for constrained in (False, True):  # warm-up
            window_rate(engine, build(engine, args.batch, constrained, args.new_tokens, 99))
        for run in range(args.runs):
            for constrained in (False, True) if run % 2 == 0 else (True, False):
                reqs = build(engine, args.batch, constrained, args.new_tokens, run)
                timers.reset()
                rate = window_rate(engine, reqs)
                row = {
                    "kind": "json_schema" if constrained else "free",
                    "tok_s": round(rate["tok_s"], 1),
                    "per_step_us": timers.per_step_us(args.device),
                }
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
