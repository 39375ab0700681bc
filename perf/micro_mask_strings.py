"""What one grammar mask costs along a JSON reply, by the schema's string bound and the
whitespace the grammar allows (issue 15; Qwen's 151,643-id vocabulary).

Six token streams are drawn once, as a random-weight model at temperature 1 writes them: a
walk that picks uniformly among the tokens the bench schema's mask allows (``bench_constrained``'s
``SCHEMA``: an array of objects with an integer, a string of ``maxLength`` 12 and a
boolean), without whitespace. The same streams are then replayed through grammars that
differ in one thing, timing every mask: ``maxLength`` 12 / 64 / none, and the whitespace
between JSON tokens (Fermi's bounded default, none, one space, llguidance's own default).
Each grammar is replayed twice on one compiler; the second pass is reported (llguidance
builds its lexer states lazily, and a server's long run sees them built).

    .venv/bin/python perf/micro_mask_strings.py --tiktoken .whl/qwen.tiktoken \\
        --out perf/results/cpu_mask_strings.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB = 151_936


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiktoken", required=True)
    p.add_argument("--streams", type=int, default=6)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch
    from bench_constrained import SCHEMA, tiktoken_bpe

    from fermi.grammar import JSON_WHITESPACE, Grammar, GrammarCompiler
    from fermi.sampling import mask_words, unpack_bits

    tok = tiktoken_bpe(args.tiktoken, VOCAB)
    compiler = GrammarCompiler(tok, frozenset({tok.eos_token_id}), VOCAB)
    bits = torch.zeros(1, mask_words(VOCAB), dtype=torch.int32)

    def grammar(max_length: int | None, whitespace: dict | None) -> Grammar:
        schema = copy.deepcopy(SCHEMA)
        name = schema["properties"]["items"]["items"]["properties"]["name"]
        name.pop("maxLength")
        if max_length is not None:
            name["maxLength"] = max_length
        if whitespace is not None:  # (the caller's x-guidance replaces Fermi's default)
            schema["x-guidance"] = whitespace
        g = Grammar.json_schema(schema)
        compiler.check(g)
        return g

    compact = {"whitespace_flexible": False}
    rng = random.Random(0)
    streams = []
    draw = grammar(12, compact)
    for _ in range(args.streams):
        m, ids = compiler.matcher(draw), []
        for _ in range(args.tokens):
            m.fill(bits[0])
            allowed = unpack_bits(bits, VOCAB)[0].nonzero().flatten().tolist()
            ids.append(rng.choice(allowed))
            assert m.advance(ids[-1])
        streams.append(ids)

    def replay(g: Grammar) -> dict:
        for _ in range(2):
            times = []
            for ids in streams:
                m = compiler.matcher(g)
                for t in ids:
                    started = time.perf_counter()
                    m.fill(bits[0])
                    times.append(time.perf_counter() - started)
                    assert m.advance(t)
        times.sort()
        return {
            "mean_us": round(1e6 * statistics.mean(times), 1),
            "median_us": round(1e6 * statistics.median(times), 1),
            "p90_us": round(1e6 * times[int(0.9 * len(times))], 1),
            "max_us": round(1e6 * times[-1], 1),
        }

    cases = {
        "maxLength 12, Fermi's whitespace": (12, None),
        "maxLength 64, Fermi's whitespace": (64, None),
        "no maxLength, Fermi's whitespace": (None, None),
        "maxLength 12, no whitespace": (12, compact),
        "maxLength 12, one optional space": (12, {"whitespace_pattern": "[ ]?"}),
        "maxLength 12, llguidance's default": (12, {}),
    }
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.processor() or platform.machine(),
        "fermi_whitespace": JSON_WHITESPACE,
        "masks_per_case": args.streams * args.tokens,
        "cases": {},
    }
    for name, (max_length, whitespace) in cases.items():
        result["cases"][name] = replay(grammar(max_length, whitespace))
        print(f"{name:38s} {result['cases'][name]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
