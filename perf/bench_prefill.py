"""TTFT on one CUDA GPU: causal prefill (no mask) against the masked path, in one process.

A chunk that starts its sequence attends causally over its own keys with no mask
(``Decoder.prefill_is_causal``); ``model.causal_prefill = False`` sends it down the masked
path that chunks after cached context take, which is what every prefill did before. Both
paths' graphs are captured by the same warm-up, so one process on the same random bf16
weights (real shapes, ``fermi.models.shapes``) times both, alternating run by run:

- the runner's prefill alone (``CudaGraphRunner.prefill`` of the whole prompt, synchronized);
- TTFT through the engine (scheduler, sampling, detokenizer), the figure issue 17 quotes,
  each run on a prompt whose first token differs so that nothing is reused from the cache;
- which kernels each path launches (torch.profiler over one eager run of the compiled
  layers, outside the graphs), and the mask bytes the masked path builds and reads;
- the two paths' last-token logits on one prompt (bf16: max |diff| and argmax agreement);
- Dynamo compiles during the timed part (0: both paths were warmed).

Run on the GPU machine from the repository root::

    PYTHONPATH=$PWD python3 perf/bench_prefill.py --models Qwen3-1.7B Qwen3-8B \\
        --prompt 2048 --runs 10 --out $OUT/h200_prefill_causal.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import our_decoder, our_engine, prompt_ids

PATHS = ("causal", "masked")


def use_path(model, path: str) -> None:
    model.causal_prefill = path == "causal"


def distinct(prompt: list[int], i: int, vocab: int) -> list[int]:
    """``prompt`` with another first token: no prefix of an earlier run is reused."""
    return [(prompt[0] + 1 + i) % vocab, *prompt[1:]]


def time_runner_prefill(runner, prompt: list[int], runs: int) -> dict:
    import torch

    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(runs + 1):  # the first round is a warm-up, not recorded
        for path in PATHS:
            use_path(runner.model, path)
            torch.cuda.synchronize()
            start = time.perf_counter()
            runner.prefill(0, prompt, 0)
            torch.cuda.synchronize()
            if i:
                times[path].append(1e3 * (time.perf_counter() - start))
    return {p: summary(times[p]) for p in PATHS}


def time_engine_ttft(engine, model, prompt: list[int], runs: int) -> dict:
    vocab = model.cfg.vocab_size
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    kw = {"max_tokens": 1, "ignore_eos": True, "temperature": 0}
    n = 0
    for i in range(runs + 1):
        for path in PATHS:
            use_path(model, path)
            out = engine.generate(prompt_token_ids=distinct(prompt, n, vocab), **kw)
            n += 1
            assert out.usage.cached_tokens == 0, "a run reused an earlier prompt's cache"
            if i:
                times[path].append(1e3 * out.time_to_first_token)
    return {p: summary(times[p]) for p in PATHS}


def summary(values: list[float]) -> dict:
    return {
        "median_ms": statistics.median(values),
        "min_ms": min(values),
        "max_ms": max(values),
        "all_ms": [round(v, 3) for v in values],
    }


def kernels(runner, prompt: list[int], path: str, top: int = 8) -> list[dict]:
    """The CUDA kernels of one prefill of ``prompt`` on ``path``, by device time: the
    compiled layers run eagerly (as the runner's rehearsal before a capture does)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fermi.runners.torch_cuda import _no_duck_shapes, pick

    use_path(runner.model, path)
    runner.prefill(0, prompt, 0)  # fills the runner's inputs for this prompt
    t = pick(len(prompt), runner.chunk_sizes)
    causal = runner.model.prefill_is_causal(0)
    kv = pick(t if causal else len(prompt), runner.kv_sizes)
    with torch.inference_mode(), _no_duck_shapes():
        runner._prefill_body(t, kv, causal)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner._prefill_body(t, kv, causal)
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": e.key[:160], "calls": e.count, "ms": us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def mask_bytes(model, t: int, kv: int) -> dict:
    """What the masked path's mask costs: built once per forward, read by every layer's
    attention once per KV head (an upper bound: L2 keeps part of it)."""
    cfg = model.cfg
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    built = groups * t * kv * 2  # [1, 1, G*T, kv] in bf16
    reads = built * cfg.num_key_value_heads * cfg.num_hidden_layers
    return {"built_mib": built / 2**20, "read_gib_upper_bound": reads / 2**30}


def logits_agreement(runner, prompt: list[int]) -> dict:
    out = {}
    for path in PATHS:
        use_path(runner.model, path)
        out[path] = runner.prefill(0, prompt, 0).float()
    diff = (out["causal"] - out["masked"]).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "logit_std": out["masked"].std().item(),
        "argmax_equal": bool(out["causal"].argmax() == out["masked"].argmax()),
    }


def bench_model(name: str, args) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from fermi.models.shapes import config
    from fermi.runners.torch_cuda import pick

    torch.cuda.empty_cache()
    torch._dynamo.reset()
    cfg = config(name)
    model = our_decoder(cfg)
    started = time.perf_counter()
    engine, runner = our_engine(model, 1, args.max_seq_len)
    entry: dict = {
        "model": name,
        "prompt": args.prompt,
        "start": {"seconds": time.perf_counter() - started, **dataclasses.asdict(runner.startup)},
    }
    print(f"[{name}] ready in {entry['start']['seconds']:.1f} s", flush=True)
    frames = int(counters["stats"]["unique_graphs"])
    prompt = prompt_ids(args.prompt, cfg["vocab_size"], args.prompt)
    entry["logits"] = logits_agreement(runner, prompt)
    entry["runner_prefill"] = time_runner_prefill(runner, prompt, args.runs)
    entry["engine_ttft"] = time_engine_ttft(engine, model, prompt, args.runs)
    entry["compiles_while_timed"] = int(counters["stats"]["unique_graphs"]) - frames
    t = pick(args.prompt, runner.chunk_sizes)
    entry["mask"] = mask_bytes(model, t, pick(args.prompt, runner.kv_sizes))
    try:  # the profile is a diagnosis: its failure must not lose the timings above
        entry["kernels"] = {p: kernels(runner, prompt, p) for p in PATHS}
    except Exception as exc:
        entry["kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
    use_path(model, "causal")
    for key in ("runner_prefill", "engine_ttft"):
        c, m = (entry[key][p]["median_ms"] for p in PATHS)
        print(f"[{name}] {key}: causal {c:.2f} ms, masked {m:.2f} ms ({m / c:.2f}x)", flush=True)
    engine.close()
    return entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=["Qwen3-1.7B", "Qwen3-8B"])
    p.add_argument("--prompt", type=int, default=2048, help="prompt tokens (one prefill chunk)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not 1 <= args.prompt <= 2048:
        p.error("--prompt must be 1..2048 (one prefill chunk of the engine's 2048)")

    import torch

    props = torch.cuda.get_device_properties(0)
    result: dict = {
        "command": " ".join(sys.argv),
        "device": f"{props.name}, {props.multi_processor_count} SMs",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "models": [],
    }
    for name in args.models:
        try:
            result["models"].append(bench_model(name, args))
        except Exception as exc:  # one failing model must not lose the other's numbers
            import traceback

            traceback.print_exc()
            result["models"].append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        json.dumps([{k: m.get(k) for k in ("model", "logits", "mask")} for m in result["models"]])
    )


if __name__ == "__main__":
    main()
