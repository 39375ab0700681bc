"""Host-side costs of a grammar constraint, with a real 151,643-id vocabulary (issue 15).

Qwen's vocabulary comes from a tiktoken rank file (``qwen.tiktoken``, shipped inside the
``dashscope`` wheel on PyPI: ``pip download dashscope --no-deps`` and unzip
``dashscope/resources/qwen.tiktoken``). Measured: llguidance's view of the tokenizer, a small
schema's compile, a request's matcher (a copy of the compiled one), and one step's masks
for 8 rows filled one after another against llguidance's thread pool
(``fill_next_token_bitmask_par``), each row walking the schema with random allowed tokens.

    .venv/bin/python perf/micro_grammar_host.py --tiktoken qwen.tiktoken \
        --out perf/results/cpu_grammar_host.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

VOCAB = 151_936  # Qwen3's logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiktoken", required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import llguidance
    import llguidance.torch
    import torch
    from bench_constrained import RESPONSE_FORMAT, tiktoken_bpe

    from fermi.grammar import Grammar, GrammarCompiler
    from fermi.sampling import mask_words, unpack_bits

    tok = tiktoken_bpe(args.tiktoken, VOCAB)
    compiler = GrammarCompiler(tok, frozenset({tok.eos_token_id}), VOCAB)
    started = time.perf_counter()
    compiler._tokenizer()
    tokenizer_s = time.perf_counter() - started

    compiles, copies = [], []
    for i in range(5):
        schema = {
            "type": "object",
            "properties": {f"k{i}": {"type": "integer"}, "name": {"type": "string"}},
            "required": ["name"],
        }
        grammar = Grammar.json_schema(schema)
        started = time.perf_counter()
        compiler.check(grammar)
        compiles.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.matcher(grammar)
        copies.append(time.perf_counter() - started)

    grammar = Grammar.from_response_format(RESPONSE_FORMAT)
    compiler.check(grammar)
    matchers = [compiler.matcher(grammar) for _ in range(8)]
    bits = torch.zeros(8, mask_words(VOCAB), dtype=torch.int32)
    executor = llguidance.LLExecutor()
    rng = random.Random(0)
    serial, pooled, one_row = [], [], []
    for _ in range(args.steps):
        pairs = [(m._m, i) for i, m in enumerate(matchers)]
        started = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask_par(executor, pairs, bits)
        pooled.append(time.perf_counter() - started)
        started = time.perf_counter()
        for i, m in enumerate(matchers):
            t = time.perf_counter()
            m.fill(bits[i])
            one_row.append(time.perf_counter() - t)
        serial.append(time.perf_counter() - started)
        for i, m in enumerate(matchers):
            allowed = unpack_bits(bits[i : i + 1], VOCAB)[0].nonzero().flatten().tolist()
            assert m.advance(rng.choice(allowed))

    def us(values: list[float]) -> float:
        return 1e6 * statistics.median(values)

    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "vocabulary_ids": tok.vocab_size,
        "llguidance_tokenizer_s": tokenizer_s,
        "schema_compile_ms": [1e3 * c for c in compiles],
        "matcher_copy_us": [1e6 * c for c in copies],
        "fill_8_rows_serial_median_us": us(serial),
        "fill_8_rows_thread_pool_median_us": us(pooled),
        "fill_one_row_median_us": us(one_row),
        "fill_one_row_p90_us": 1e6 * sorted(one_row)[int(0.9 * len(one_row))],
        "steps": args.steps,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
