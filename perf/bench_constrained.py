"""What a JSON-schema constraint costs per generated token, at batch 1 and 8 (issue 15).

Each run submits ``batch`` requests at once and measures decode tokens per second over the
window in which all of them are generating (from the last first token to the first end),
with and without ``response_format`` (a JSON schema), interleaved run by run. Sampling is
seeded at temperature 1 in both, so both run the same sampling variant; the constrained
rows also pay the host's mask work (llguidance), the mask copy and the masked sampling.
The schema asks for an array of at least 1,000 small objects, so no request ends before
``--new-tokens`` (the unconstrained ones run with ``ignore_eos``).

On a GPU the model is random bf16 weights at a real model's shapes (``--shape``), with a
synthetic byte-level BPE vocabulary of the model's size (151,936 ids for Qwen3): the mask
work depends on the vocabulary's size and structure, not on the weights. On a CPU it is
the offline SmolLM2-135M-Instruct and its own tokenizer.

    PYTHONPATH=$PWD python perf/bench_constrained.py --device cuda --shape Qwen3-1.7B \
        --out perf/results/h200_constrained.json
    .venv/bin/python perf/bench_constrained.py --device cpu --new-tokens 48 \
        --out perf/results/cpu_constrained.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "name": {"type": "string", "maxLength": 12},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "ok"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 1000, "items": ITEM}},
    "required": ["items"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "rows", "schema": SCHEMA}}


def synthetic_bpe(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer with ``vocab_size`` ids: the 256 byte symbols, merges of
    existing tokens into word-like pieces (mostly letters, many with a leading space, as in
    real vocabularies) up to 16 characters, and an end-of-turn special token last."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from fermi.text.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    letters = [c for c in alphabet if c.isalpha() and c.isascii()]
    space = "Ġ"  # the byte-level symbol of " "
    rng = random.Random(seed)
    pieces = list(letters)
    merges: list[tuple[str, str]] = []
    target = vocab_size - 1
    while len(vocab) < target:
        left = rng.choice(pieces) if rng.random() < 0.8 else rng.choice(alphabet)
        right = rng.choice(pieces)
        if rng.random() < 0.3 and not left.startswith(space):
            left, right = space, left
        new = left + right
        if new in vocab or len(new) > 16:
            continue
        vocab[new] = len(vocab)
        merges.append((left, right))
        pieces.append(new)
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken("<|im_end|>", special=True)])
    return Tokenizer(tok, chat_template=None, bos_token=None, eos_token="<|im_end|>")


def tiktoken_bpe(path: str, vocab_size: int):
    """A byte-level BPE tokenizer from a tiktoken rank file (base64 token, rank per line),
    e.g. Qwen's ``qwen.tiktoken`` (151,643 ids, the regular vocabulary Qwen2 and Qwen3 share):
    the merges are the splits of each token into two tokens of lower rank."""
    import base64

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from fermi.text.tokenizer import Tokenizer

    ranks: dict[bytes, int] = {}
    for line in Path(path).read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    to_char = {b: c for b, c in zip(range(256), _byte_chars(), strict=True)}

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        splits = [
            (max(ranks[token[:i]], ranks[token[i:]]), i)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        if splits:
            i = min(splits)[1]
            merges.append((rank, text(token[:i]), text(token[i:])))
    merges.sort()
    tok = tokenizers.Tokenizer(models.BPE(vocab, [(a, b) for _, a, b in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken("<|im_end|>", special=True)])
    return Tokenizer(tok, chat_template=None, bos_token=None, eos_token="<|im_end|>")


def _byte_chars() -> list[str]:
    """The printable stand-in of each byte in byte-level BPE vocabularies (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def gpu_engine(shape: str, max_batch: int, max_seq_len: int, tiktoken: str | None):
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_decode import our_decoder

    from fermi.engine.api import Engine
    from fermi.loading import GenerationDefaults
    from fermi.models.shapes import config
    from fermi.runners.torch_cuda import CudaGraphRunner

    cfg = config(shape)
    model = our_decoder(cfg)
    started = time.perf_counter()
    runner = CudaGraphRunner(model, max_batch, max_seq_len, prefill_chunk=512)
    warm = time.perf_counter() - started
    if tiktoken:
        tok = tiktoken_bpe(tiktoken, cfg["vocab_size"])
    else:
        tok = synthetic_bpe(cfg["vocab_size"])
    eos = tok.eos_token_id
    engine = Engine(runner, tok, GenerationDefaults(eos_token_ids=(eos,)), model_name=shape)
    vocabulary = f"tiktoken file {Path(tiktoken).name}" if tiktoken else "synthetic byte-level BPE"
    about = {"shape": shape, "warmup_s": warm, "gpu": torch.cuda.get_device_name()}
    return engine, {**about, "vocabulary": vocabulary, "tokenizer_ids": tok.vocab_size}


def cpu_engine(model: str, max_batch: int, max_seq_len: int):
    import fermi

    engine = fermi.load(model, device="cpu", max_batch=max_batch, max_seq_len=max_seq_len)
    return engine, {"model": model}


def window_rate(engine, requests: list) -> dict:
    """Tokens per second while every request generates (last first token -> first end)."""
    stamps: list[list[tuple[float, int]]] = [[] for _ in requests]
    done = threading.Semaphore(0)

    def sink(i: int, delta) -> None:
        stamps[i].append((time.perf_counter(), len(delta.token_ids)))
        if delta.finish_reason is not None:
            done.release()

    handles = [engine.submit(r, lambda d, i=i: sink(i, d)) for i, r in enumerate(requests)]
    for _ in handles:
        done.acquire()
    start = max(s[0][0] for s in stamps)
    end = min(s[-1][0] for s in stamps)
    tokens = sum(n for s in stamps for t, n in s if start < t <= end)
    return {"tok_s": tokens / (end - start), "window_s": end - start, "tokens": tokens}


def build(engine, batch: int, constrained: bool, new_tokens: int, run: int) -> list:
    requests = []
    for i in range(batch):
        kw = {
            "prompt": f"Write {batch} rows of data, run {run} item {i}:",
            "max_tokens": new_tokens,
            "temperature": 1.0,
            "seed": 1000 * run + i,
        }
        if constrained:
            kw["response_format"] = RESPONSE_FORMAT
        else:
            kw["ignore_eos"] = True
        requests.append(engine.build_request(**kw))
    return requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", default="Qwen3-1.7B", help="model shapes on the GPU")
    p.add_argument("--model", default="smollm2-135m", help="model on the CPU")
    p.add_argument("--tiktoken", default=None, help="GPU: a tiktoken rank file as vocabulary")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    max_batch, max_seq_len = max(args.batches), 1024
    if args.device == "cuda":
        engine, about = gpu_engine(args.shape, max_batch, max_seq_len, args.tiktoken)
    else:
        engine, about = cpu_engine(args.model, max_batch, max_seq_len)
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **about,
        "schema": SCHEMA,
        "batches": {},
    }
    t = time.perf_counter()
    engine.grammars.check(engine.build_request(prompt="x", response_format=RESPONSE_FORMAT).grammar)
    result["first_grammar_compile_s"] = time.perf_counter() - t
    with engine:
        for batch in args.batches:
            # A warm-up of each kind (captures the masked step's graphs on first use).
            for constrained in (False, True):
                window_rate(engine, build(engine, batch, constrained, args.new_tokens, 99))
            runs = {"free": [], "json_schema": []}
            for run in range(args.runs):
                order = (False, True) if run % 2 == 0 else (True, False)
                for constrained in order:
                    reqs = build(engine, batch, constrained, args.new_tokens, run)
                    runs["json_schema" if constrained else "free"].append(window_rate(engine, reqs))
            free = statistics.median(r["tok_s"] for r in runs["free"])
            json_rate = statistics.median(r["tok_s"] for r in runs["json_schema"])
            result["batches"][str(batch)] = {
                "free_tok_s": free,
                "json_schema_tok_s": json_rate,
                "slowdown_pct": 100 * (free / json_rate - 1),
                "runs": runs,
            }
            print(f"batch {batch}: free {free:.1f} tok/s, json_schema {json_rate:.1f} tok/s "
                  f"({100 * (free / json_rate - 1):+.1f}% per token)", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
