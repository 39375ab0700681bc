"""Grammar-constrained decoding libraries on the CPU: xgrammar vs llguidance (issue 15).

For each library and four constraints (any JSON object, a small JSON schema, an
OpenAI-style tool call, a date regex) this measures grammar compile time (cold, and
cached where the library caches), the per-request matcher set-up, the per-step token
mask computation while stepping through a valid answer tokenized with the SmolLM2
tokenizer, a batch-8 mask fill, and applying a bitmask to [1, vocab] float32 logits.
It checks correctness on the way: every token of the valid answer is allowed, EOS is
allowed at the end and the matcher then reports termination, clearly invalid answers
are rejected, and special tokens are never allowed. A coverage probe compiles schemas
using individual JSON Schema keywords and records whether each is enforced or the error
text. The two libraries run interleaved, alternating which goes first.

Neither library is a Fermi dependency: they are imported here only, lazily.

    .venv/bin/pip install xgrammar llguidance
    .venv/bin/python perf/bench_grammar.py --out perf/results/cpu_grammar_libraries.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

import fermi

# --- constraints and the answers stepped through ---------------------------------------

ANY_OBJECT = {"type": "object"}

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "age": {"type": "integer"},
        "tier": {"type": "string", "enum": ["free", "pro", "enterprise"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer"},
                },
                "required": ["sku", "quantity"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["customer", "age", "tier", "items"],
    "additionalProperties": False,
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_flights",
            "description": "Flights between two airports on a date.",
            "parameters": {
                "type": "object",
                "properties": {
                    "origin": {"type": "string"},
                    "destination": {"type": "string"},
                    "passengers": {"type": "integer"},
                    "nonstop": {"type": "boolean"},
                },
                "required": ["origin", "destination", "passengers"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "description": "Send an email.",
            "parameters": {
                "type": "object",
                "properties": {
                    "to": {"type": "array", "items": {"type": "string"}},
                    "subject": {"type": "string"},
                    "body": {"type": "string"},
                },
                "required": ["to", "subject", "body"],
                "additionalProperties": False,
            },
        },
    },
]


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A Hermes-style call body {"name": ..., "arguments": {...}} for one of the tools."""
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool["function"]["name"]},
                    "arguments": tool["function"]["parameters"],
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in tools
        ]
    }


DATE_REGEX = r"\d{4}-\d{2}-\d{2}"

CONSTRAINTS: dict[str, dict[str, Any]] = {
    "any_json_object": {
        "kind": "json_schema",
        "spec": ANY_OBJECT,
        "valid": json.dumps(
            {
                "city": "Paris",
                "temperature": 21.5,
                "conditions": ["sunny", "light wind"],
                "alerts": None,
                "forecast": {"tomorrow": {"high": 24, "low": 13}, "rain": False},
                "note": 'Quoted "text", unicode café and a \\ backslash',
            },
            ensure_ascii=False,  # raw UTF-8, as a model writes it (see the escape probe)
        ),
        "invalid": {
            "array_not_object": '["not", "an", "object"]',
            "trailing_comma": '{"a": 1,}',
            "json_then_prose": '{"a": 1} Hope this helps!',
            "bad_literal": '{"a": tru}',
            "truncated": '{"a": [1, 2',
        },
    },
    "order_schema": {
        "kind": "json_schema",
        "spec": ORDER_SCHEMA,
        "valid": json.dumps(
            {
                "customer": "Ada Lovelace",
                "age": 36,
                "tier": "enterprise",
                "items": [
                    {"sku": "AX-1029", "quantity": 2},
                    {"sku": "BQ-7", "quantity": 10},
                    {"sku": "ZZ-300-K", "quantity": 1},
                ],
            }
        ),
        "invalid": {
            "age_as_string": '{"customer": "Ada", "age": "36", "tier": "pro", "items": []}',
            "tier_not_in_enum": '{"customer": "Ada", "age": 36, "tier": "gold", "items": []}',
            "extra_property": (
                '{"customer": "Ada", "age": 36, "tier": "pro", "items": [], "vip": true}'
            ),
            "missing_required": '{"customer": "Ada", "age": 36, "tier": "pro"}',
            "nested_extra_property": (
                '{"customer": "Ada", "age": 36, "tier": "pro", '
                '"items": [{"sku": "A", "quantity": 1, "gift": true}]}'
            ),
            "float_quantity": (
                '{"customer": "Ada", "age": 36, "tier": "pro", '
                '"items": [{"sku": "A", "quantity": 1.5}]}'
            ),
        },
    },
    "tool_call": {
        "kind": "json_schema",
        "spec": tool_call_schema(TOOLS),
        "valid": json.dumps(
            {
                "name": "search_flights",
                "arguments": {
                    "origin": "SFO",
                    "destination": "NRT",
                    "passengers": 2,
                    "nonstop": True,
                },
            }
        ),
        "invalid": {
            "unknown_function": '{"name": "delete_everything", "arguments": {}}',
            "args_of_other_function": (
                '{"name": "get_weather", "arguments": {"origin": "SFO", '
                '"destination": "NRT", "passengers": 2}}'
            ),
            "missing_required_argument": (
                '{"name": "send_email", "arguments": {"to": ["a@b.c"], "subject": "Hi"}}'
            ),
            "bad_enum_argument": (
                '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "kelvin"}}'
            ),
        },
    },
    "date_regex": {
        "kind": "regex",
        "spec": DATE_REGEX,
        "valid": "2024-02-29",
        "invalid": {
            "short_month": "2024-2-29",
            "letters": "abcd-02-29",
            "trailing_text": "2024-02-29T10:00",
            "truncated": "2024-02",
        },
    },
}

# JSON Schema keyword probes: (schema, an instance it accepts, an instance it rejects).
PROBES: dict[str, tuple[dict[str, Any], str, str]] = {
    "pattern": ({"type": "string", "pattern": "^[a-z]{3}$"}, '"abc"', '"abcd"'),
    "format_date": ({"type": "string", "format": "date"}, '"2024-01-05"', '"yesterday"'),
    "format_email": ({"type": "string", "format": "email"}, '"a@b.co"', '"not an email"'),
    "format_uuid": (
        {"type": "string", "format": "uuid"},
        '"123e4567-e89b-12d3-a456-426614174000"',
        '"123"',
    ),
    "minLength_maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, '"ab"', '"a"'),
    "minItems_maxItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
        "[1, 2]",
        "[1]",
    ),
    "minimum_maximum": ({"type": "integer", "minimum": 1, "maximum": 10}, "5", "11"),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, "0.5", "0"),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "15", "7"),
    "const": ({"const": "yes"}, '"yes"', '"no"'),
    # json.dumps' default ASCII escapes of printable characters, e.g. "café" -> "caf\u00e9"
    "string_printable_unicode_escape": ({"type": "string"}, '"caf\\u00e9"', "1"),
    "enum_mixed": ({"enum": [1, "two", None]}, '"two"', "2"),
    "oneOf": (
        {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        "3",
        "true",
    ),
    "allOf": (
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]},
            ]
        },
        '{"a": 1, "b": "x"}',
        '{"a": 1}',
    ),
    "recursive_ref": (
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "value": {"type": "integer"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["value", "children"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/node",
        },
        '{"value": 1, "children": [{"value": 2, "children": []}]}',
        '{"value": 1, "children": [{"x": 2}]}',
    ),
    "additionalProperties_unspecified": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        '{"a": 1}',
        '{"a": 1, "b": 2}',  # JSON Schema allows this; "rejected" means the library is stricter
    ),
    "property_order": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
        '{"a": 1, "b": 2}',
        '{"b": 2, "a": 1}',  # valid JSON Schema; "rejected" means declared order is enforced
    ),
    "patternProperties": (
        {
            "type": "object",
            "patternProperties": {"^x_": {"type": "integer"}},
            "additionalProperties": False,
        },
        '{"x_a": 1}',
        '{"y": 1}',
    ),
    "uniqueItems": (
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        "[1, 2]",
        "[1, 1]",
    ),
    "not": ({"not": {"type": "string"}}, "1", '"s"'),
    "if_then_else": (
        {
            "type": "object",
            "properties": {"k": {"type": "string"}, "v": {}},
            "if": {"properties": {"k": {"const": "n"}}},
            "then": {"properties": {"v": {"type": "integer"}}},
            "else": {"properties": {"v": {"type": "string"}}},
        },
        '{"k": "n", "v": 1}',
        '{"k": "n", "v": "x"}',
    ),
    "dependentRequired": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentRequired": {"a": ["b"]},
        },
        '{"a": 1, "b": 2}',
        '{"a": 1}',
    ),
    "contains": (
        {"type": "array", "items": {"type": "integer"}, "contains": {"const": 7}},
        "[1, 7]",
        "[1, 2]",
    ),
}

GRAMMAR_PROBES = {
    # (kind, grammar text, accepted, rejected)
    "lark_yes_no": ("lark", 'start: "yes" | "no"', "yes", "maybe"),
    "gbnf_yes_no": ("ebnf", 'root ::= "yes" | "no"', "yes", "maybe"),
}


# --- the two libraries behind one small interface ---------------------------------------


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: Any, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.threads = threads
        backend = tok.backend
        vocab = backend.get_vocab(with_added_tokens=True)
        encoded = [""] * tok.vocab_size
        for text, index in vocab.items():
            encoded[index] = text
        # The vocabulary and its byte-level flag come from the tokenizers object; no
        # transformers tokenizer is needed (from_huggingface wants a PreTrainedTokenizerFast).
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        self.tokenizer_build_meta = {
            "vocab_type": meta["vocab_type"].name,
            "add_prefix_space": meta["add_prefix_space"],
        }
        started = time.perf_counter()
        self.info = xgr.TokenizerInfo(
            encoded,
            meta["vocab_type"],
            vocab_size=tok.vocab_size,
            stop_token_ids=[tok.eos_token_id],
            add_prefix_space=meta["add_prefix_space"],
        )
        self.tokenizer_build_s = time.perf_counter() - started
        self.compiler = self.new_compiler()

    def new_compiler(self) -> Any:
        return self.xgr.GrammarCompiler(self.info, max_threads=self.threads)

    def compile(self, kind: str, spec: Any, compiler: Any = None) -> Any:
        compiler = compiler or self.compiler
        if kind == "json_schema":
            return compiler.compile_json_schema(json.dumps(spec))
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "lark":
            return compiler.compile_lark(spec)
        if kind == "ebnf":
            return compiler.compile_grammar(spec)
        raise ValueError(kind)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def complete(self, matcher: Any) -> bool:
        return matcher.is_completed()

    def terminated(self, matcher: Any) -> bool:
        return matcher.is_terminated()

    def batch_filler(self) -> Any:
        batch = self.xgr.BatchGrammarMatcher(max_threads=self.threads)
        return lambda matchers, bitmask: batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def memory_bytes(self, compiled: Any) -> int | None:
        return compiled.memory_size_bytes


class Llguidance:
    name = "llguidance"

    def __init__(self, tok: Any, threads: int) -> None:
        import llguidance
        import llguidance.torch

        self.llg = llguidance
        self.llg_torch = llguidance.torch
        self.threads = threads
        self.tokenizer_build_meta = {"source": "tokenizers.Tokenizer.to_str() JSON"}
        started = time.perf_counter()
        # LLTokenizer takes the tokenizers JSON itself (llguidance.hf.from_tokenizer does the
        # same after unwrapping a transformers tokenizer).
        self.tokenizer = llguidance.LLTokenizer(
            tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_token_id
        )
        self.tokenizer_build_s = time.perf_counter() - started
        self._grammars: dict[str, str] = {}

    def grammar(self, kind: str, spec: Any) -> str:
        matcher = self.llg.LLMatcher
        if kind == "json_schema":
            return matcher.grammar_from_json_schema(json.dumps(spec))
        if kind == "regex":
            return matcher.grammar_from_regex(spec)
        if kind == "lark":
            return matcher.grammar_from_lark(spec)
        if kind == "ebnf":
            return self.llg.grammar_from("gbnf", spec)
        raise ValueError(kind)

    def compile(self, kind: str, spec: Any, compiler: Any = None) -> Any:
        # No compile cache: the grammar is compiled when the matcher is built. A compiled
        # result here is the grammar text plus one matcher (errors surface there).
        text = self.grammar(kind, spec)
        matcher = self.llg.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return text

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled, log_level=0)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        self.llg_torch.fill_next_token_bitmask(matcher, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def complete(self, matcher: Any) -> bool:
        return matcher.is_accepting()

    def terminated(self, matcher: Any) -> bool:
        return matcher.is_stopped() and not matcher.is_error()

    def batch_filler(self) -> Any:
        executor = self.llg.LLExecutor(num_threads=self.threads)
        fill_par = self.llg_torch.fill_next_token_bitmask_par

        def fill(matchers: list[Any], bitmask: torch.Tensor) -> None:
            fill_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

        return fill

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.llg_torch.apply_token_bitmask_inplace(logits, bitmask)

    def memory_bytes(self, compiled: Any) -> int | None:
        return None


# --- helpers ----------------------------------------------------------------------------


def allowed(bitmask: torch.Tensor, token: int, row: int = 0) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def allowed_count(bitmask: torch.Tensor, vocab: int) -> int:
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return int(bits.reshape(-1)[:vocab].sum())


def summary_us(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {
        "median_us": round(statistics.median(ordered) / 1000, 2),
        "p99_us": round(p99 / 1000, 2),
        "max_us": round(ordered[-1] / 1000, 2),
        "n": len(ordered),
    }


def summary_ms(samples_s: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(samples_s) * 1000, 3),
        "min_ms": round(min(samples_s) * 1000, 3),
        "max_ms": round(max(samples_s) * 1000, 3),
        "n": len(samples_s),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 600 else text[:600] + "…"


def walk(lib: Any, compiled: Any, ids: list[int], bitmask: torch.Tensor, eos: int) -> dict:
    """Step through `ids` on a fresh matcher; return whether each was allowed and the end."""
    matcher = lib.matcher(compiled)
    for index, token in enumerate(ids):
        lib.fill(matcher, bitmask)
        if not allowed(bitmask, token):
            return {"rejected_at": index, "state": "token not in mask"}
        if not lib.accept(matcher, token):
            return {"rejected_at": index, "state": "accept returned false"}
    lib.fill(matcher, bitmask)
    eos_ok = allowed(bitmask, eos)
    return {
        "rejected_at": None if eos_ok else len(ids),
        "state": "EOS allowed at end" if eos_ok else "EOS not allowed at end",
        "complete": lib.complete(matcher),
    }


# --- measurements -----------------------------------------------------------------------


def check_valid(lib: Any, compiled: Any, tok: Any, ids: list[int], vocab: int) -> dict:
    eos = tok.eos_token_id
    other_special = sorted(tok.special_ids - {eos})
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    matcher = lib.matcher(compiled)
    disallowed = []
    special_allowed_steps = 0
    eos_allowed_early = 0
    allowed_counts = []
    for index, token in enumerate(ids):
        lib.fill(matcher, bitmask)
        allowed_counts.append(allowed_count(bitmask, vocab))
        if any(allowed(bitmask, s) for s in other_special):
            special_allowed_steps += 1
        if allowed(bitmask, eos):
            eos_allowed_early += 1
        if not allowed(bitmask, token):
            disallowed.append({"step": index, "token": tok.id_to_token(token)})
        if not lib.accept(matcher, token):
            disallowed.append({"step": index, "token": tok.id_to_token(token), "accept": False})
            break
    lib.fill(matcher, bitmask)
    eos_at_end = allowed(bitmask, eos)
    complete = lib.complete(matcher)
    terminated_before_eos = lib.terminated(matcher)
    accepted_eos = lib.accept(matcher, eos) if eos_at_end else False
    return {
        "tokens": len(ids),
        "all_tokens_allowed": not disallowed,
        "disallowed": disallowed[:5],
        "eos_allowed_at_end": eos_at_end,
        "complete_at_end": complete,
        "terminated_before_eos": terminated_before_eos,
        "eos_accepted": accepted_eos,
        "terminated_after_eos": lib.terminated(matcher),
        "steps_with_eos_allowed_before_end": eos_allowed_early,
        "steps_with_other_special_token_allowed": special_allowed_steps,
        "allowed_tokens_per_step": {
            "min": min(allowed_counts),
            "median": statistics.median(allowed_counts),
            "max": max(allowed_counts),
        },
    }


def check_invalid(lib: Any, compiled: Any, tok: Any, cases: dict[str, str], vocab: int) -> dict:
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    out = {}
    for name, text in cases.items():
        ids = tok.encode(text)
        result = walk(lib, compiled, ids, bitmask, tok.eos_token_id)
        at = result["rejected_at"]
        out[name] = {
            "text": text,
            "rejected": at is not None,
            "rejected_at_token": at,
            "rejected_text_prefix": tok.decode(ids[:at]) if at is not None else None,
            "how": result["state"],
        }
    return out


def time_steps(lib: Any, compiled: Any, ids: list[int], vocab: int, samples: dict) -> None:
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    clock = time.perf_counter_ns
    started = clock()
    matcher = lib.matcher(compiled)
    samples["matcher_ns"].append(clock() - started)
    fill_ns, accept_ns = samples["fill_ns"], samples["accept_ns"]
    for token in ids:
        t0 = clock()
        lib.fill(matcher, bitmask)
        t1 = clock()
        lib.accept(matcher, token)
        t2 = clock()
        fill_ns.append(t1 - t0)
        accept_ns.append(t2 - t1)


def time_batch(
    lib: Any, compiled: Any, ids: list[int], vocab: int, batch: int, parallel: bool
) -> list[int]:
    bitmask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
    if parallel:
        fill = lib.batch_filler()
    else:

        def fill(matchers: list[Any], bitmask: torch.Tensor) -> None:
            for row, matcher in enumerate(matchers):
                lib.fill(matcher, bitmask[row : row + 1])

    matchers = [lib.matcher(compiled) for _ in range(batch)]
    clock = time.perf_counter_ns
    out = []
    for token in ids:
        t0 = clock()
        fill(matchers, bitmask)
        out.append(clock() - t0)
        for matcher in matchers:
            lib.accept(matcher, token)
    assert all(allowed(bitmask, ids[-1], row) for row in range(batch))
    return out


def measure_compile(libs: list[Any], rounds: int) -> dict:
    out: dict[str, dict[str, Any]] = {lib.name: {} for lib in libs}
    cold: dict[tuple[str, str], list[float]] = {}
    cached: dict[tuple[str, str], list[float]] = {}
    for name, constraint in CONSTRAINTS.items():
        for lib in libs:  # the very first compile in the process, kept apart
            compiler = lib.new_compiler() if lib.name == "xgrammar" else None
            started = time.perf_counter()
            compiled = lib.compile(constraint["kind"], constraint["spec"], compiler)
            out[lib.name][name] = {
                "first_compile_ms": round((time.perf_counter() - started) * 1000, 3),
                "memory_size_bytes": lib.memory_bytes(compiled),
            }
    for round_index in range(rounds):
        order = libs if round_index % 2 == 0 else libs[::-1]
        for name, constraint in CONSTRAINTS.items():
            for lib in order:
                # Cold: xgrammar gets a fresh compiler (empty cache); llguidance has none.
                compiler = lib.new_compiler() if lib.name == "xgrammar" else None
                started = time.perf_counter()
                lib.compile(constraint["kind"], constraint["spec"], compiler)
                cold.setdefault((lib.name, name), []).append(time.perf_counter() - started)
                started = time.perf_counter()
                lib.compile(constraint["kind"], constraint["spec"], compiler)
                cached.setdefault((lib.name, name), []).append(time.perf_counter() - started)
    for (lib_name, name), values in cold.items():
        out[lib_name][name]["cold_compile"] = summary_ms(values)
        out[lib_name][name]["second_compile"] = summary_ms(cached[(lib_name, name)])
    return out


def measure_apply(libs: list[Any], compiled: Any, ids: list[int], vocab: int, iters: int):
    """Bitmask -> [1, vocab] float32 logits, CPU: each library's helper and plain torch.

    Two real masks from the order schema (inside a string value: nearly all tokens allowed;
    after a key: a handful allowed), at 1 torch thread and at the machine's default.
    """
    xgr_lib = next(lib for lib in libs if lib.name == "xgrammar")
    shifts = torch.arange(32, dtype=torch.int32)
    base = torch.randn(1, vocab, dtype=torch.float32)
    masks = {}
    for label, prefix in (("inside_string", 6), ("after_key", 2)):
        matcher = xgr_lib.matcher(compiled)
        for token in ids[:prefix]:
            matcher.accept_token(token)
        bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
        matcher.fill_next_token_bitmask(bitmask)
        masks[label] = bitmask

    def torch_unpack(logits: torch.Tensor, mask: torch.Tensor) -> None:
        bits = ((mask.unsqueeze(-1) >> shifts) & 1).reshape(mask.shape[0], -1)
        logits.masked_fill_(bits[:, : logits.shape[1]] == 0, float("-inf"))

    bool_masks = {
        id(mask): ((mask.unsqueeze(-1) >> shifts) & 1).reshape(1, -1)[:, :vocab] == 0
        for mask in masks.values()
    }

    def torch_bool(logits: torch.Tensor, mask: torch.Tensor) -> None:
        logits.masked_fill_(bool_masks[id(mask)], float("-inf"))

    methods = {f"{lib.name}_helper": lib.apply for lib in libs}
    methods["torch_unpack_bits_masked_fill"] = torch_unpack
    methods["torch_masked_fill_precomputed_bool"] = torch_bool
    out: dict[str, Any] = {"first_call": {}}
    working = {}
    for name, method in methods.items():
        logits = base.clone()
        started = time.perf_counter()
        try:
            method(logits, masks["inside_string"])
        except Exception as exc:
            out["first_call"][name] = {"error": error_text(exc)}
            continue
        out["first_call"][name] = {"ms": round((time.perf_counter() - started) * 1000, 3)}
        working[name] = method
    default_threads = torch.get_num_threads()
    clock = time.perf_counter_ns
    for label, bitmask in masks.items():
        reference = base.clone()
        torch_unpack(reference, bitmask)
        entry: dict[str, Any] = {"allowed_tokens": allowed_count(bitmask, vocab)}
        for name, method in working.items():
            logits = base.clone()
            method(logits, bitmask)
            entry[f"{name}_matches_reference"] = bool(torch.equal(logits, reference))
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            samples: dict[str, list[int]] = {name: [] for name in working}
            logits = base.clone()
            for round_index in range(max(2, iters // 100)):
                names = list(working) if round_index % 2 == 0 else list(working)[::-1]
                for name in names:
                    method = working[name]
                    for _ in range(100):
                        logits.copy_(base)
                        t0 = clock()
                        method(logits, bitmask)
                        samples[name].append(clock() - t0)
            entry[f"torch_threads_{threads}"] = {
                name: summary_us(values) for name, values in samples.items()
            }
        torch.set_num_threads(default_threads)
        out[label] = entry
    return out


def probe_schemas(libs: list[Any], tok: Any, vocab: int) -> dict:
    out: dict[str, dict[str, Any]] = {}
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    probes = {name: ("json_schema", *probe) for name, probe in PROBES.items()}
    probes.update(GRAMMAR_PROBES)
    for name, (kind, spec, good, bad) in probes.items():
        out[name] = {}
        for lib in libs:
            try:
                compiled = lib.compile(kind, spec)
            except Exception as exc:
                out[name][lib.name] = {"compiles": False, "error": error_text(exc)}
                continue
            good_walk = walk(lib, compiled, tok.encode(good), bitmask, tok.eos_token_id)
            bad_walk = walk(lib, compiled, tok.encode(bad), bitmask, tok.eos_token_id)
            out[name][lib.name] = {
                "compiles": True,
                "accepts_valid": good_walk["rejected_at"] is None,
                "rejects_invalid": bad_walk["rejected_at"] is not None,
            }
    return out


def unsupported_errors(libs: list[Any]) -> dict:
    """Error text for schema input each library should refuse, and a clearly bad schema."""
    cases = {
        "unknown_keyword_x-foo": {"type": "string", "x-foo": 1},
        "unsupported_uniqueItems": PROBES["uniqueItems"][0],
        "unsupported_not": PROBES["not"][0],
        "unsupported_if_then_else": PROBES["if_then_else"][0],
        "dangling_ref": {"$ref": "#/$defs/missing"},
        "bad_type": {"type": "strnig"},
        "bad_pattern": {"type": "string", "pattern": "(["},
    }
    out: dict[str, dict[str, Any]] = {}
    for name, schema in cases.items():
        out[name] = {"schema": schema}
        for lib in libs:
            try:
                lib.compile("json_schema", schema)
                out[name][lib.name] = "compiled without error"
            except Exception as exc:
                out[name][lib.name] = error_text(exc)
    # llguidance also has a lenient mode and returns warnings; record what it says.
    llg = next((lib for lib in libs if lib.name == "llguidance"), None)
    if llg is not None:
        matcher = llg.llg.LLMatcher
        for name in ("unsupported_uniqueItems", "unsupported_not"):
            schema = out[name]["schema"]
            text = matcher.grammar_from_json_schema(json.dumps(schema), overrides={"lenient": True})
            is_error, messages = matcher.validate_grammar_with_warnings(text, llg.tokenizer)
            out[name]["llguidance_lenient"] = {"is_error": is_error, "messages": messages}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--step-rounds", type=int, default=100, help="passes per library")
    parser.add_argument("--compile-rounds", type=int, default=20)
    parser.add_argument("--apply-iters", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    engine = fermi.load(args.model, device="cpu")
    tok = engine.tokenizer
    vocab = tok.vocab_size
    rss = [rss_bytes()]
    libs = []
    import_s = {}
    for cls in (Xgrammar, Llguidance):
        started = time.perf_counter()
        lib = cls(tok, args.threads)
        import_s[lib.name] = time.perf_counter() - started - lib.tokenizer_build_s
        libs.append(lib)
        rss.append(rss_bytes())
    result: dict[str, Any] = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("xgrammar", "llguidance", "tokenizers", "torch")
        },
        "model": args.model,
        "vocab_size": vocab,
        "library_threads": args.threads,
        "tokenizer": {
            lib.name: {
                "import_and_setup_s": round(import_s[lib.name], 3),
                "tokenizer_build_s": round(lib.tokenizer_build_s, 3),
                "rss_delta_mb": round((rss[i + 1] - rss[i]) / 2**20, 1),
                **lib.tokenizer_build_meta,
            }
            for i, lib in enumerate(libs)
        },
    }
    print(json.dumps(result["tokenizer"], indent=1), flush=True)

    result["compile"] = measure_compile(libs, args.compile_rounds)
    print("compile done", flush=True)

    constraints_out: dict[str, Any] = {}
    compiled_by: dict[str, dict[str, Any]] = {}
    for name, constraint in CONSTRAINTS.items():
        ids = tok.encode(constraint["valid"])
        compiled = {lib.name: lib.compile(constraint["kind"], constraint["spec"]) for lib in libs}
        compiled_by[name] = compiled
        entry: dict[str, Any] = {
            "kind": constraint["kind"],
            "spec": constraint["spec"],
            "valid_text": constraint["valid"],
            "valid_tokens": len(ids),
        }
        for lib in libs:
            entry[lib.name] = {
                "valid": check_valid(lib, compiled[lib.name], tok, ids, vocab),
                "invalid": check_invalid(
                    lib, compiled[lib.name], tok, constraint["invalid"], vocab
                ),
            }
        samples = {lib.name: {"matcher_ns": [], "fill_ns": [], "accept_ns": []} for lib in libs}
        for lib in libs:  # warm-up pass each, not recorded
            time_steps(lib, compiled[lib.name], ids, vocab, {k: [] for k in samples[lib.name]})
        for round_index in range(args.step_rounds):
            order = libs if round_index % 2 == 0 else libs[::-1]
            for lib in order:
                time_steps(lib, compiled[lib.name], ids, vocab, samples[lib.name])
        for lib in libs:
            s = samples[lib.name]
            entry[lib.name]["matcher_create"] = summary_us(s["matcher_ns"])
            entry[lib.name]["mask_fill_per_step"] = summary_us(s["fill_ns"])
            entry[lib.name]["accept_per_step"] = summary_us(s["accept_ns"])
            entry[lib.name]["fill_plus_accept_per_step"] = summary_us(
                [a + b for a, b in zip(s["fill_ns"], s["accept_ns"], strict=True)]
            )
        constraints_out[name] = entry
        print(name, {lib.name: entry[lib.name]["mask_fill_per_step"] for lib in libs}, flush=True)
    result["constraints"] = constraints_out

    # Batch 8: eight requests on the same schema, one batched mask fill per step.
    ids = tok.encode(CONSTRAINTS["order_schema"]["valid"])
    batch_samples: dict[str, list[int]] = {}
    for round_index in range(max(4, args.step_rounds // 4)):
        order = libs if round_index % 2 == 0 else libs[::-1]
        for lib in order:
            for parallel in (True, False):
                key = f"{lib.name}_{'parallel_api' if parallel else 'row_by_row'}"
                batch_samples.setdefault(key, []).extend(
                    time_batch(lib, compiled_by["order_schema"][lib.name], ids, vocab, 8, parallel)
                )
    result["batch8_order_schema_mask_fill_per_step"] = {
        name: summary_us(values) for name, values in batch_samples.items()
    }
    print("batch done", flush=True)

    result["apply_bitmask_1xvocab_float32"] = measure_apply(
        libs,
        compiled_by["order_schema"]["xgrammar"],
        tok.encode(CONSTRAINTS["order_schema"]["valid"]),
        vocab,
        args.apply_iters,
    )
    print("apply done", flush=True)
    result["keyword_probes"] = probe_schemas(libs, tok, vocab)
    result["unsupported_schema_errors"] = unsupported_errors(libs)
    result["rss_end_mb"] = round(rss_bytes() / 2**20, 1)

    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
