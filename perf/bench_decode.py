"""Decode benchmark on one CUDA GPU: Fermi's compiled-graph engine against transformers.

Random bf16 weights at the real shapes (speed does not depend on the values; nothing is
downloaded). Each transformers model and Fermi's decoder share the same weight tensors, so
the correctness checks compare like with like. Per model and prompt length it measures:

- ours through the whole engine (scheduler, in-graph sampling, detokenizer): TTFT and decode
  tok/s at batch 1, and aggregate decode tok/s at larger batches;
- transformers eager and transformers static cache + ``torch.compile`` (its own recipe:
  ``generate(cache_implementation="static")`` auto-compiles the decode step with
  ``mode="reduce-overhead"``), timed by a streamer that stamps every new token;
- the read-bandwidth roofline (weights read once per token over bandwidth measured in the
  same process), peak GPU memory, cold start (compile + capture, empty caches) and, in a
  fresh process, warm start to the first token;
- greedy agreement with transformers over the first 32 tokens (bf16), and fp32 logits.

Every shape in ``fermi.models.shapes`` can be named: Qwen3 0.6B-8B get the transformers
comparisons and batched rows; the others (``EXTRA``, among them issue 19's Gemma-3-1b-it,
SmolLM3-3B, Phi-4-mini-instruct, Granite-3.3-2b-instruct, Llama-3.2-1B-Instruct) are ours
at batch 1 unless ``--compare-all``. Every row records Dynamo's compiles after warm-up.

Run on the GPU machine from the repository root::

    PYTHONPATH=$PWD python3 perf/bench_decode.py --models Qwen3-0.6B --out perf/results/x.json
    PYTHONPATH=$PWD python3 perf/bench_decode.py --models Gemma-3-1b-it --prompts 128 2048 \
        --batches 1 --max-seq-len 2560 --out perf/results/h200_gemma3_1b.json
    python3 perf/bench_decode.py --report perf/results/*.json   # table for perf/README.md
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QWEN3 = ("Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B")
# The small models of issue 19 (Gemma 3's sliding/global layers with two rope tables,
# SmolLM3's NoPE layers, Phi-4-mini's partial rotary + LongRoPE, Granite's multipliers).
RECENT = (
    "Gemma-3-1b-it",
    "SmolLM3-3B",
    "Phi-4-mini-instruct",
    "Granite-3.3-2b-instruct",
    "Llama-3.2-1B-Instruct",
)
EXTRA = ("DeepSeek-R1-Distill-Qwen-1.5B", "Phi-3.5-mini-instruct", "Gemma-2-2b-it", *RECENT)


# -- measurement helpers ---------------------------------------------------------------


def measure_read_bandwidth(gib: float = 2.0, repeats: int = 20) -> float:
    """Bytes/s of a large bf16 sum (reads only), median of CUDA-event timings."""
    import torch

    n = int(gib * 2**30) // 2
    bufs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    times = []
    for i in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.sum(bufs[i % 2], dtype=torch.float32)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del bufs
    return n * 2 / statistics.median(times)


def weight_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    """Bytes of weights one decode step reads: every matrix once, one embedding row."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
    )
    d = cfg.get("head_dim") or h // heads
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * inter + 4 * h
    lm_head = cfg["vocab_size"] * h
    return dtype_bytes * (layers * per_layer + lm_head + h + h)


def wordlevel_tokenizer(vocab_size: int):
    """A tokenizer with one word per id, so the engine can detokenize any id."""
    import tokenizers

    from fermi.text.tokenizer import Tokenizer

    model = tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(tok, chat_template=None, bos_token=None, eos_token=None)


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 100000), (n,), generator=g).tolist()


class StampStreamer:
    """transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


# -- transformers ----------------------------------------------------------------------


def hf_model(cfg: dict, device: str = "cuda"):
    import torch
    import transformers

    cls = getattr(transformers, cfg["architectures"][0])
    config_cls = transformers.AutoConfig.for_model(cfg["model_type"]).__class__
    hf_cfg = config_cls(**{k: v for k, v in cfg.items() if k != "architectures"})
    hf_cfg.architectures = cfg["architectures"]
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(hf_cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_generate(model, prompt: list[int], new_tokens: int, static: bool) -> dict:
    import torch

    ids = torch.tensor([prompt], device="cuda")
    streamer = StampStreamer()
    kwargs = {"cache_implementation": "static"} if static else {}
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=streamer,
            **kwargs,
        )
    torch.cuda.synchronize()
    stamps = streamer.stamps
    return {
        "ttft_s": stamps[0] - start,
        "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "tokens": out[0, len(prompt) :].tolist(),
    }


def bench_hf(model, prompt: list[int], new_tokens: int, static: bool, runs: int) -> dict:
    import torch

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    hf_generate(model, prompt, new_tokens, static)  # warm-up (compiles when static)
    if static:
        hf_generate(model, prompt, new_tokens, static)
    warm_s = time.perf_counter() - started
    results = [hf_generate(model, prompt, new_tokens, static) for _ in range(runs)]
    return {
        "new_tokens": new_tokens,
        "runs": runs,
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in results),
        "decode_tok_s_all": [round(r["decode_tok_s"], 2) for r in results],
        "ttft_ms": 1e3 * statistics.median(r["ttft_s"] for r in results),
        "warmup_s": warm_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


# -- ours ------------------------------------------------------------------------------


def our_decoder(cfg: dict, hf=None, dtype=None):
    """Fermi's decoder on the transformers model's own tensors (no copy), or random."""
    import torch

    dtype = dtype or torch.bfloat16

    from fermi.loading import build_model
    from fermi.models.decoder import Decoder
    from fermi.models.registry import adapter_for

    adapter = adapter_for(cfg)
    mcfg = adapter.to_config(cfg)
    if hf is not None:
        weights = dict(hf.state_dict())
        return build_model(mcfg, adapter, weights, torch.device("cuda"), dtype, "hf")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Decoder(mcfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.eval().requires_grad_(False)


def our_engine(
    model, max_batch: int, max_seq_len: int, attention: str | None = None, scope: str = "layer"
):
    from fermi.engine.api import Engine
    from fermi.loading import GenerationDefaults
    from fermi.runners.torch_cuda import CudaGraphRunner

    runner = CudaGraphRunner(
        model,
        max_batch,
        max_seq_len,
        prefill_chunk=2048,
        decode_attention=attention,
        compile_scope=scope,
    )
    tok = wordlevel_tokenizer(model.cfg.vocab_size)
    return Engine(runner, tok, GenerationDefaults(), model_name="bench"), runner


def ours_batch1(engine, prompt: list[int], new_tokens: int, runs: int) -> dict:
    import torch

    kw = {"max_tokens": new_tokens, "ignore_eos": True, "temperature": 0}

    def cold(i: int) -> list[int]:  # another first token: nothing to reuse from a kept cache
        return [100 + (prompt[0] + i) % 1000, *prompt[1:]] if i else prompt

    engine.generate(prompt_token_ids=cold(runs), **kw)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    outs = [engine.generate(prompt_token_ids=cold(i), **kw) for i in range(runs - 1, -1, -1)]
    rates = [(len(o.token_ids) - 1) / o.decode_time for o in outs]
    # The last prompt again: all but its last token come from the cache it left.
    again = [engine.generate(prompt_token_ids=prompt, **kw) for _ in range(runs)]
    return {
        "ttft_reused_ms": 1e3 * statistics.median(o.time_to_first_token for o in again),
        "cached_tokens_reused": again[-1].usage.cached_tokens,
        "new_tokens": new_tokens,
        "runs": runs,
        "decode_tok_s": statistics.median(rates),
        "decode_tok_s_all": [round(r, 2) for r in rates],
        "ttft_ms": 1e3 * statistics.median(o.time_to_first_token for o in outs),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tokens": outs[-1].token_ids,
    }


def ours_batched(engine, batch: int, prompt_len: int, new_tokens: int, runs: int) -> dict:
    """Aggregate decode tok/s with ``batch`` concurrent requests (first token to last)."""
    vocab = engine.capabilities.vocab_size
    rates = []
    for run in range(runs + 1):
        handles, done = [], threading.Semaphore(0)
        for i in range(batch):
            req = engine.build_request(
                prompt_token_ids=prompt_ids(prompt_len, vocab, 1000 + i),
                max_tokens=new_tokens,
                temperature=0,
                ignore_eos=True,
            )
            handles.append(engine.submit(req, functools.partial(_release_at_end, done)))
        for _ in handles:
            done.acquire()
        first = max(h.first_token_at for h in handles)
        last = max(h.finished_at for h in handles)
        # Tokens produced after every request had its first token, over that window.
        produced = sum(new_tokens - 1 for _ in handles) - sum(
            _tokens_before(h, first, new_tokens) for h in handles
        )
        if run > 0:
            rates.append(produced / (last - first))
    return {"batch": batch, "runs": runs, "decode_tok_s": statistics.median(rates)}


def _release_at_end(done: threading.Semaphore, delta) -> None:
    if delta.finish_reason is not None:
        done.release()


def _tokens_before(handle, t: float, new_tokens: int) -> float:
    """Estimated tokens a request produced between its first token and ``t``."""
    span = handle.finished_at - handle.first_token_at
    if span <= 0:
        return 0.0
    frac = min(max((t - handle.first_token_at) / span, 0.0), 1.0)
    return frac * (new_tokens - 1)


def greedy_loop_seconds(runner, context: int, steps: int) -> float:
    """Wall time of ``steps`` greedy one-row decode steps of slot 0 from ``context``, with
    the host loop included (each step's token comes back before the next is sent)."""
    import torch

    token, batch = 5, runner.sampling
    torch.cuda.synchronize()
    started = time.perf_counter()
    for s in range(steps):
        out = runner.decode_sample(
            [0],
            [token],
            [context + s],
            batch,
            use_filters=False,
            use_penalties=False,
            want_logprobs=-1,
        )
        token = int(out.tokens[0])
    return time.perf_counter() - started


def ours_raw_context(model, max_seq_len: int, context: int, steps: int = 64) -> float:
    """Runner-level decode tok/s at a given context (no scheduler), for the length test."""

    from fermi.runners.torch_cuda import CudaGraphRunner

    runner = CudaGraphRunner(model, 1, max_seq_len, prefill_chunk=512)
    vocab = model.cfg.vocab_size
    ids = prompt_ids(context, vocab, 7)
    for start in range(0, context, 512):
        runner.prefill(0, ids[start : start + 512], start)
    batch = runner.sampling
    batch.temperature[0] = 0.0
    rates = [steps / greedy_loop_seconds(runner, context, steps) for _ in range(4)]
    return statistics.median(rates[1:])


def fp32_logit_check(hf, cfg: dict, prompt: list[int], steps: int = 8) -> dict:
    """Max |logit difference| between our decoder and transformers, both in float32."""
    import torch

    hf.float()
    ours = our_decoder(cfg, hf, torch.float32)  # shares the float32 tensors
    ours.setup_cache(1, len(prompt) + steps + 1)
    ids = torch.tensor([prompt], device="cuda")
    worst, scale = 0.0, 0.0
    with torch.inference_mode():
        ref = hf(ids, use_cache=True)
        past = ref.past_key_values
        pos = torch.arange(len(prompt), device="cuda")[None]
        slot = torch.zeros(1, dtype=torch.long, device="cuda")
        mine = ours(ids, pos, slot, kv_len=len(prompt))
        for step in range(steps + 1):
            diff = (mine - ref.logits[:, -1].float()).abs().max().item()
            worst, scale = max(worst, diff), max(scale, ref.logits.abs().max().item())
            nxt = ref.logits[:, -1].argmax(-1, keepdim=True)
            if step == steps:
                break
            p = len(prompt) + step
            ref = hf(nxt, past_key_values=past, use_cache=True)
            past = ref.past_key_values
            mine = ours(nxt, torch.tensor([[p]], device="cuda"), slot, kv_len=p + 1)
    return {"max_abs_diff": worst, "max_abs_logit": scale, "steps": steps + 1}


# -- start-up probe (fresh process) ----------------------------------------------------


def start_probe(name: str) -> None:
    """Print seconds from interpreter start to the first generated token, as JSON."""
    t0 = time.perf_counter()
    import logging

    import torch

    # The runner's warm-up milestones, timestamped, on stderr (kept by run_probe on error).
    logging.basicConfig(format="%(relativeCreated)8.0f ms %(name)s %(message)s")
    logging.getLogger("fermi").setLevel(logging.INFO)

    from fermi.models.shapes import config

    imported = time.perf_counter()
    cfg = config(name)
    model = our_decoder(cfg)
    built = time.perf_counter()
    engine, runner = our_engine(model, 8, 4096)
    warmed = time.perf_counter()
    out = engine.generate(prompt_token_ids=prompt_ids(128, cfg["vocab_size"], 1), max_tokens=1)
    torch.cuda.synchronize()
    done = time.perf_counter()
    engine.close()
    print(
        json.dumps(
            {
                "import_s": imported - t0,
                "build_weights_s": built - imported,
                "compile_and_capture_s": warmed - built,
                "first_token_s": done - warmed,
                "to_first_token_s": done - t0,
                "excluding_weights_s": done - t0 - (built - imported),
                "cache_hit": runner.startup.cache_hit,
                "compiles": runner.startup.compiles,
                "graphs": runner.startup.graphs,
                "tokens": len(out.token_ids),
            }
        )
    )


def run_probe(name: str, cache: Path) -> dict:
    env = {
        **os.environ,
        "FERMI_COMPILE_CACHE": str(cache / "fermi"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--start-probe", name],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "wall_s": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


# -- main ------------------------------------------------------------------------------


def bench_model(name: str, args, bandwidth: float, entry: dict, save) -> None:
    """Fill ``entry`` measurement by measurement, calling ``save()`` after each."""
    import torch

    from fermi.models.shapes import config

    cfg = config(name)
    vocab = cfg["vocab_size"]
    wbytes = weight_bytes_per_token(cfg)
    roof = bandwidth / wbytes
    entry.update({"model": name, "weight_bytes_per_token": wbytes, "roofline_tok_s": roof})
    qwen3 = name in QWEN3 or args.compare_all  # transformers comparisons, batched rows

    def log(msg: str) -> None:
        print(f"[{name}] {msg}", flush=True)
        save()

    torch.cuda.empty_cache()
    torch._dynamo.reset()  # each model compiles afresh; keeps Dynamo's per-code caches small
    hf = hf_model(cfg) if qwen3 and not args.skip_hf else None
    model = our_decoder(cfg, hf)
    max_batch = max(args.batches) if qwen3 else 1
    started = time.perf_counter()
    engine, runner = our_engine(
        model, max_batch, args.max_seq_len, args.decode_attention, args.compile_scope
    )
    entry["ours_start"] = {
        "cold_start_s": time.perf_counter() - started,
        "max_batch": max_batch,
        "max_seq_len": args.max_seq_len,
        **dataclasses.asdict(runner.startup),
    }
    log(f"engine ready in {entry['ours_start']['cold_start_s']:.1f}s")
    from torch._dynamo.utils import counters

    frames_after_warmup = int(counters["stats"]["unique_graphs"])
    for plen in args.prompts:
        prompt = prompt_ids(plen, vocab, plen)
        res = ours_batch1(engine, prompt, args.new_tokens, args.runs)
        res["roofline_share"] = res["decode_tok_s"] / roof
        ours_tokens = res.pop("tokens")
        entry[f"ours_b1_p{plen}"] = res
        log(f"ours p{plen}: {res['decode_tok_s']:.1f} tok/s, TTFT {res['ttft_ms']:.1f} ms")
        if hf is not None and plen == args.prompts[0]:
            ref = hf_generate(hf, prompt, 32, static=False)["tokens"]
            pairs = list(zip(ours_tokens[:32], ref[:32], strict=True))
            agree = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
            same = sum(a == b for a, b in pairs)
            entry["greedy_agreement_32"] = {"prefix": agree, "positions_equal": same}
            log(f"greedy agreement: prefix {agree}/32")
    if qwen3:
        for b in args.batches:
            if b == 1:
                continue
            res = ours_batched(engine, b, args.prompts[0], args.new_tokens, max(args.runs, 3))
            entry[f"ours_b{b}_p{args.prompts[0]}"] = res
            log(f"ours batch {b}: {res['decode_tok_s']:.1f} tok/s aggregate")
    entry["recompiles_after_warmup"] = int(counters["stats"]["unique_graphs"]) - frames_after_warmup
    engine.close()
    del engine, runner
    if hf is not None:
        for plen in args.hf_prompts if args.hf_prompts is not None else args.prompts:
            prompt = prompt_ids(plen, vocab, plen)
            n = args.hf_eager_tokens
            res = bench_hf(hf, prompt, n, static=False, runs=args.runs)
            res["roofline_share"] = res["decode_tok_s"] / roof
            entry[f"hf_eager_p{plen}"] = res
            log(f"hf eager p{plen}: {res['decode_tok_s']:.1f} tok/s")
            torch._dynamo.reset()
            res = bench_hf(hf, prompt, args.new_tokens, static=True, runs=args.runs)
            res["roofline_share"] = res["decode_tok_s"] / roof
            entry[f"hf_static_p{plen}"] = res
            log(f"hf static+compile p{plen}: {res['decode_tok_s']:.1f} tok/s")
        if args.fp32_check:
            del model
            torch.cuda.empty_cache()
            entry["fp32_logits"] = fp32_logit_check(hf, cfg, prompt_ids(128, vocab, 3))
            log(f"fp32 logits: {entry['fp32_logits']}")
    del hf
    torch.cuda.empty_cache()


def context_test(name: str, context: int) -> dict:
    """Decode speed at one context length with a short and a long max_seq_len."""
    import torch

    from fermi.models.shapes import config

    out = {"model": name, "context": context}
    model = our_decoder(config(name))
    for max_len in (1024, 32768):
        torch._dynamo.reset()
        out[f"max_seq_len_{max_len}_tok_s"] = ours_raw_context(model, max_len, context)
    out["ratio"] = out["max_seq_len_32768_tok_s"] / out["max_seq_len_1024_tok_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(QWEN3))
    p.add_argument("--extra", action="store_true", help="also the non-Qwen3 shapes, ours only")
    p.add_argument(
        "--compare-all",
        action="store_true",
        help="transformers comparisons and batched rows for every model, not only Qwen3",
    )
    p.add_argument("--prompts", type=int, nargs="*", default=[128, 2048])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--hf-eager-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--hf-prompts", type=int, nargs="*", default=None, help="[default: --prompts]")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--decode-attention", default=None, choices=["split", "flex", "math", "sdpa"])
    p.add_argument("--compile-scope", default="layer", choices=["layer", "model"])
    p.add_argument("--fp32-check", action="store_true")
    p.add_argument("--context-test", default=None, help="model name for the 500-token test")
    p.add_argument("--start-test", nargs="*", default=[], help="models for cold/warm start")
    p.add_argument("--start-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", nargs="*", default=None, help="print a table from JSON files")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.start_probe:
        start_probe(args.start_probe)
        return
    if args.report is not None:
        print(report([json.loads(Path(f).read_text()) for f in args.report]))
        return

    import logging

    import torch
    import transformers

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("fermi").setLevel(logging.INFO)
    props = torch.cuda.get_device_properties(0)
    result: dict = {
        "command": " ".join(sys.argv),
        "device": f"{props.name}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "models": [],
    }
    out_path = Path(args.out) if args.out else None

    def save() -> None:
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1))

    result["read_bandwidth_gb_s"] = measure_read_bandwidth() / 1e9
    print(f"read bandwidth {result['read_bandwidth_gb_s']:.0f} GB/s", flush=True)
    names = list(args.models) + (list(EXTRA) if args.extra else [])
    for name in names:
        entry: dict = {"model": name}
        result["models"].append(entry)
        try:
            bench_model(name, args, result["read_bandwidth_gb_s"] * 1e9, entry, save)
        except Exception as exc:  # one failing shape must not lose the others' numbers
            import traceback

            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {exc}"
        save()
    if args.context_test:
        result["context_test"] = context_test(args.context_test, 500)
        print(f"context test: {result['context_test']}", flush=True)
        save()
    for name in args.start_test:
        with tempfile.TemporaryDirectory() as tmp:
            cold = run_probe(name, Path(tmp))
            warm = run_probe(name, Path(tmp))
        result.setdefault("start", {})[name] = {"cold": cold, "warm": warm}
        print(f"start {name}: cold {cold} warm {warm}", flush=True)
        save()
    print(report([result]))


# -- report ----------------------------------------------------------------------------


def _fmt(value, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def report(results: list[dict]) -> str:
    """Markdown tables: batch-1 decode, TTFT, batches, memory, correctness."""
    lines = [
        "| model | prompt | ours tok/s | roofline share | HF eager tok/s | HF static+compile "
        "tok/s | ours / HF static | ours TTFT ms | HF static TTFT ms | ours peak GiB "
        "| recompiles after warm-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    extras = []
    for res in results:
        for m in res["models"]:
            if "error" in m:
                lines.append(f"| {m['model']} | error: {m['error'][:80]} |")
                continue
            for key in sorted(k for k in m if k.startswith("ours_b1_p")):
                plen = key.removeprefix("ours_b1_p")
                ours, eager = m[key], m.get(f"hf_eager_p{plen}")
                static = m.get(f"hf_static_p{plen}")
                ratio = ours["decode_tok_s"] / static["decode_tok_s"] if static else None
                lines.append(
                    f"| {m['model']} | {plen} | {ours['decode_tok_s']:.0f} | "
                    f"{100 * ours['roofline_share']:.0f}% | "
                    f"{_fmt(eager and eager['decode_tok_s'])} | "
                    f"{_fmt(static and static['decode_tok_s'])} | {_fmt(ratio, '.2f')} | "
                    f"{ours['ttft_ms']:.1f} | {_fmt(static and static['ttft_ms'], '.1f')} | "
                    f"{ours['peak_gib']:.1f} | {_fmt(m.get('recompiles_after_warmup'), 'd')} |"
                )
            batched = [m[k] for k in m if k.startswith("ours_b") and not k.startswith("ours_b1_")]
            b1 = m.get("ours_b1_p128")
            for b in batched:
                if "batch" in b and b1:
                    extras.append(
                        f"| {m['model']} | {b['batch']} | {b['decode_tok_s']:.0f} | "
                        f"{b['decode_tok_s'] / b1['decode_tok_s']:.1f}x |"
                    )
    out = "\n".join(lines)
    if extras:
        out += (
            "\n\n| model | batch | aggregate tok/s (prompt 128) | vs batch 1 |\n|---|---|---|---|\n"
        )
        out += "\n".join(extras)
    return out


if __name__ == "__main__":
    main()
