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

    .venv/bin/python perf/profile_engine_host.py --device cpu --tiktoken .whl/qwen.tiktoken \
        --out perf/results/cpu_engine_host.json
    PYTHONPATH=$PWD python perf/profile_engine_host.py --device cuda --shape Qwen3-1.7B \
        --tiktoken .whl/qwen.tiktoken --out perf/results/h200_engine_host.json

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
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_constrained import build, gpu_engine, tiktoken_bpe, window_rate


def tiny_cpu_engine(tiktoken: str, max_batch: int, max_seq_len: int):
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
    torch.manual_seed(0)
    model = Decoder(adapter_for(cfg).to_config(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    runner = TorchRunner(model.eval().requires_grad_(False), max_batch, max_seq_len)
    tok = tiktoken_bpe(tiktoken, cfg["vocab_size"])
    defaults = GenerationDefaults(eos_token_ids=(tok.eos_token_id,))
    engine = Engine(runner, tok, defaults, model_name="qwen3-tiny")
    return engine, {"shape": "Qwen3 vocabulary, 2 layers of 64", "tokenizer_ids": tok.vocab_size}


class Timers:
    """Wraps the engine's phases; ``calls[name]`` holds each call's seconds."""

    def __init__(self, engine) -> None:
        from fermi.runners.base import StepOutput

        self.calls: dict[str, list[float]] = defaultdict(list)
        self.steps = 0
        sched, runner = engine._core.scheduler, engine.runner
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

    def reset(self) -> None:
        self.calls.clear()

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
        return us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", default="Qwen3-1.7B")
    p.add_argument("--tiktoken", required=True, help="a tiktoken rank file (Qwen's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()

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
