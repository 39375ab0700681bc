"""Constrained decoding: a request's grammar turned into a per-step token bitmask.

A :class:`Grammar` says what the output must match: a JSON schema, any JSON object, a
regular expression or a Lark grammar (llguidance's dialect, which can embed JSON schemas
with ``%json {...}``). :class:`GrammarCompiler` checks it against the model's tokenizer once
per distinct grammar (a 400 naming the unsupported keyword, not a silent fallback) and hands
out one :class:`Matcher` per request. The engine asks the matcher for the tokens it allows
before each sampled token (``fill``: an int32 bitmask row, bit ``t`` set when token ``t``
may come next) and tells it the token that was chosen (``advance``).

The library underneath is llguidance: measured against xgrammar in ``perf/notes_grammar.md``
(it names the schema keyword it cannot enforce, keeps special tokens out of JSON strings, and
has no dependencies). Its matchers are built from a compiled prototype with ``deep_copy``,
which costs microseconds instead of the ~1 ms of a fresh build.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fermi.errors import RequestError

log = logging.getLogger(__name__)

GrammarKind = Literal["json_schema", "json_object", "regex", "lark"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Bounds on what one request may ask the grammar compiler to do.
MAX_GRAMMAR_CHARS = 256 * 1024
# Distinct compiled grammars kept (an agent sends the same tools with every request).
CACHE_SIZE = 64
# llguidance's limits on the work one grammar may cost (``llguidance.LLParserLimits``;
# its rates are its own figures). Its defaults allow a lexer of 250,000 states (1-2 kB
# each: up to ~500 MB for one request) and 200,000 fuel a mask (~14 ms of one core, on
# the engine thread, for every row of every step); a request may cost at most a fifth of
# either here. A grammar past them at compile time is a 400; past them mid-generation, the
# reply ends with an error naming the limit, never with a clean stop on cut-off output.
LIMITS = {
    "step_lexer_fuel": 40_000,  # ~3 ms a mask
    "max_lexer_states": 50_000,  # <= ~100 MB
    "verbose_errors": False,  # errors say what, without dumping the grammar's state
}


@dataclass(frozen=True)
class Grammar:
    """What a constrained output must match. ``source`` is the JSON schema as JSON text, the
    regular expression, or the Lark grammar; empty for ``json_object``."""

    kind: GrammarKind
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> Grammar:
        return cls("json_schema", json.dumps(schema, sort_keys=False, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> Grammar:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls("regex", pattern)

    @classmethod
    def lark(cls, text: str) -> Grammar:
        return cls("lark", text)

    @classmethod
    def parse(cls, value: Any, param: str = "grammar") -> Grammar:
        """A grammar from the Python API's or gRPC's ``grammar=``: a :class:`Grammar`, or a
        dict ``{"type": "json_schema"|"json_object"|"regex"|"lark", "value": ...}``."""
        if isinstance(value, Grammar):
            return value
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise RequestError(
                'grammar must be {"type": "json_schema"|"json_object"|"regex"|"lark", '
                '"value": ...}',
                param,
            )
        kind, body = value["type"], value.get("value")
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            if isinstance(body, str):
                try:
                    body = json.loads(body)
                except json.JSONDecodeError as exc:
                    raise RequestError(f"the JSON schema is not JSON: {exc}", param) from None
                except RecursionError:
                    raise RequestError("the JSON schema is nested too deeply", param) from None
            if not isinstance(body, dict | bool):
                raise RequestError("a json_schema grammar's value must be a schema", param)
            return cls.json_schema(body)
        if kind in ("regex", "lark"):
            if not isinstance(body, str) or not body:
                raise RequestError(f"a {kind} grammar's value must be a non-empty string", param)
            return cls(kind, body)
        raise RequestError(f"unknown grammar type {kind!r}", param)

    @classmethod
    def from_response_format(cls, value: Any, param: str = "response_format") -> Grammar | None:
        """The grammar of OpenAI's ``response_format``: None for ``{"type": "text"}``, any
        JSON object for ``json_object``, the schema of ``json_schema`` (``strict`` or not:
        the output always follows the schema)."""
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise RequestError(
                'response_format must be an object with a "type": "text", "json_object" '
                'or "json_schema"',
                param,
            )
        kind = value["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind != "json_schema":
            raise RequestError(
                f"response_format type must be text, json_object or json_schema, not {kind!r}",
                f"{param}.type",
            )
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError(
                'a json_schema response_format needs "json_schema": {"name": ..., "schema": ...}',
                f"{param}.json_schema",
            )
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RequestError(
                "json_schema.name must be 1-64 letters, digits, underscores or dashes",
                f"{param}.json_schema.name",
            )
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError(
                "json_schema.strict must be a boolean", f"{param}.json_schema.strict"
            )
        schema = spec.get("schema")
        if schema is None:
            return cls.json_object()
        if not isinstance(schema, dict):
            raise RequestError(
                "json_schema.schema must be a JSON schema object", f"{param}.json_schema.schema"
            )
        return cls.json_schema(schema)

    def _llguidance_text(self) -> str:
        import llguidance

        ll = llguidance.LLMatcher
        if self.kind == "json_object":
            return ll.grammar_from_json_schema(json.dumps(bounded_whitespace({"type": "object"})))
        if self.kind == "json_schema":
            schema = json.loads(self.source)
            check_min_properties(schema)
            if isinstance(schema, dict):
                schema = bounded_whitespace(schema)
            return ll.grammar_from_json_schema(json.dumps(schema))
        if self.kind == "regex":
            return ll.grammar_from_regex(self.source)
        return ll.grammar_from_lark(self.source)


# Keywords whose values are JSON data, not schemas: a "$ref" or "minProperties" key inside
# them is a value.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def schema_objects(schema: Any) -> Iterator[dict[str, Any]]:
    """Every object of a JSON schema that is a schema (not data), walked without recursion."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            stack.extend(v for k, v in node.items() if k not in DATA_KEYWORDS)


def check_min_properties(schema: Any) -> None:
    """Refuse a ``minProperties`` above 1 on an object that may have keys besides those in
    ``properties``: llguidance keeps a listed key from repeating, not an additional one, and
    a JSON parser counts a repeated key once, so ``{"a": 1, "a": 2}`` would pass the grammar
    and fail ``minProperties: 2``."""
    for node in schema_objects(schema):
        least = node.get("minProperties")
        closed = node.get("additionalProperties") is False and not node.get("patternProperties")
        if isinstance(least, int) and least > 1 and not closed:
            raise ValueError(
                f"minProperties {least} needs additionalProperties: false (and no "
                "patternProperties): the grammar cannot keep an additional key from "
                "repeating, and a repeated key counts once"
            )


# Whitespace between JSON tokens, bounded: unbounded whitespace lets a weak model spend its
# whole token budget on newlines. One space, or one newline and an indent of up to 20, still
# lets a model write the compact or the pretty-printed JSON it learned.
JSON_WHITESPACE = r"(?:[ \t]|\n[ \t]{0,20})?"


def bounded_whitespace(schema: dict[str, Any]) -> dict[str, Any]:
    if "x-guidance" in schema:  # the caller chose llguidance's JSON options
        return schema
    return {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}


class Matcher:
    """One request's position in its grammar. Not thread-safe: the engine thread owns it."""

    __slots__ = ("_m", "eos_ids", "finished")

    def __init__(self, matcher: Any, eos_ids: frozenset[int]) -> None:
        self._m = matcher
        self.eos_ids = eos_ids
        self.finished = False  # the grammar is complete and cannot go on

    def fill(self, row: torch.Tensor) -> None:
        """Write the bitmask of the tokens allowed next into ``row`` (int32 [words], CPU,
        contiguous). A finished matcher allows everything (its row's token is never used)."""
        if self.finished:
            row.fill_(-1)
            return
        if row.dtype != torch.int32 or row.device.type != "cpu" or not row.is_contiguous():
            raise ValueError("a mask row is a contiguous int32 tensor in host memory")
        # llguidance writes the mask straight into the row's memory (without the GIL).
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def advance(self, token: int) -> bool:
        """Take the sampled ``token``; False when the grammar rejects it (the mask allowed it,
        so that is a bug). Sets ``finished`` when the output is complete."""
        if self._m.is_error():  # e.g. a step past the grammar's limits (LIMITS)
            return False
        if token in self.eos_ids and self._m.is_accepting():
            self.finished = True
            return True
        if not self._m.consume_token(token):
            return False
        if self._m.is_stopped():
            self.finished = True
        return True

    @property
    def error(self) -> str | None:
        """llguidance's reason, its first line only (the rest dumps the grammar's state)."""
        return _clean(self._m.get_error()) if self._m.is_error() else None

    @property
    def over_limits(self) -> bool:
        """The matcher stopped because a step (a mask, or taking a token) cost more than
        :data:`LIMITS` allow, not because a token broke the grammar: llguidance puts both
        in one error state, and says of the latter that the token "doesn't satisfy the
        grammar"."""
        return self._m.is_error() and "doesn't satisfy the grammar" not in self._m.get_error()


class GrammarCompiler:
    """Compiles grammars for one tokenizer, keeps the last ``CACHE_SIZE``, makes matchers.

    Thread-safe: request builders call ``check`` from any thread; the engine thread calls
    ``matcher``."""

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], vocab_size: int) -> None:
        self._backend = tokenizer.backend
        # The end the grammar offers once the output is complete: the tokenizer's own eos
        # when it is one of the model's, else the first of them.
        main = tokenizer.eos_token_id
        self._eos = main if main in eos_ids else next(iter(sorted(eos_ids)), None)
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self._tok: Any = None
        self._tok_error: str | None = None  # why llguidance cannot read the tokenizer
        self._tok_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cache: OrderedDict[Grammar, Any] = OrderedDict()
        self._preparing: threading.Thread | None = None

    def prepare_in_background(self) -> None:
        """Build llguidance's view of the tokenizer on a daemon thread (0.3 s for a 49k
        vocabulary, seconds for 152k), so the first constrained request does not wait."""
        thread = threading.Thread(target=self._prepare, name="fermi-grammar-init", daemon=True)
        thread.start()
        self._preparing = thread

    def wait_prepared(self) -> None:
        """Wait for ``prepare_in_background``'s thread (the engine's close does, so that no
        thread of the engine is left running when the interpreter exits)."""
        if self._preparing is not None:
            self._preparing.join()

    def _prepare(self) -> None:
        try:
            self._tokenizer()
        except RequestError as exc:  # said once here; every constrained request is refused
            log.warning("%s", exc)

    def _tokenizer(self, param: str = "grammar") -> Any:
        with self._tok_lock:  # one build; callers that come during it wait for it
            if self._tok is None and self._tok_error is None:
                import llguidance

                # The model may have more logits than the tokenizer has ids (padded
                # embeddings): the mask covers every logit; ids past the tokenizer are
                # never allowed.
                try:
                    self._tok = llguidance.LLTokenizer(
                        llguidance.TokenizerWrapper(
                            _TextTokens(self._backend, self._eos, self.vocab_size)
                        ),
                        n_vocab=self.vocab_size,
                        eos_token=self._eos,
                    )
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # also a Rust panic (pyo3's PanicException)
                    self._tok_error = (
                        f"structured outputs and tools need a grammar over this model's "
                        f"tokenizer, which llguidance cannot read ({_clean(exc)})"
                    )
            if self._tok_error is not None:
                raise RequestError(self._tok_error, param)
            return self._tok

    def check(self, grammar: Grammar, param: str = "grammar", what: str | None = None) -> Any:
        """Compile ``grammar`` (or find it compiled); a RequestError naming what is wrong,
        ``what`` the grammar is to the caller (default: its kind; a tool call's grammar is
        written in lark, but what the caller gave was the tools' schemas). Returns the
        compiled grammar, for ``matcher``."""
        return self._prototype(grammar, param, what or grammar.kind)

    def matcher(self, grammar: Grammar, compiled: Any = None) -> Matcher:
        """A fresh matcher at the start of ``grammar``: a copy of ``compiled`` (what
        ``check`` returned, on the request's thread) when given, so that the engine thread
        never compiles, even after the grammar left the cache."""
        if compiled is None:
            compiled = self._prototype(grammar, "grammar", grammar.kind)
        return Matcher(compiled.deep_copy(), self.eos_ids)

    def fill(self, rows: list[tuple[Matcher, int]], bits: torch.Tensor) -> None:
        """Fill ``bits[i]`` for each (matcher, i), one after another: for 8 rows of Qwen's
        vocabulary that took 60 µs on this project's 2-core CPU, and 268 µs through
        llguidance's thread pool (``fill_next_token_bitmask_par``), whose hand-offs cost
        more than the masks (``perf/results/cpu_grammar_host.json``)."""
        for matcher, i in rows:
            matcher.fill(bits[i])

    def _prototype(self, grammar: Grammar, param: str, what: str) -> Any:
        with self._lock:
            found = self._cache.get(grammar)
            if found is not None:
                self._cache.move_to_end(grammar)
                return found
        if len(grammar.source) > MAX_GRAMMAR_CHARS:
            raise RequestError(
                f"the {what} grammar is {len(grammar.source)} characters; "
                f"at most {MAX_GRAMMAR_CHARS} are accepted",
                param,
            )
        import llguidance

        try:
            text = grammar._llguidance_text()
        except (ValueError, RuntimeError) as exc:
            raise RequestError(f"unsupported {what}: {_clean(exc)}", param) from None
        limits = llguidance.LLParserLimits(**LIMITS)
        matcher = llguidance.LLMatcher(self._tokenizer(param), text, log_level=0, limits=limits)
        if matcher.is_error():
            raise RequestError(f"unsupported {what}: {_clean(matcher.get_error())}", param)
        # The first mask here, on the caller's thread, not in the engine's step: llguidance
        # builds its lexer lazily (about a second for some short regexes), and a grammar
        # that cannot produce anything shows itself only then.
        first = torch.empty(1, (self.vocab_size + 31) // 32, dtype=torch.int32)
        Matcher(matcher, self.eos_ids).fill(first[0])
        if matcher.is_stopped() and not matcher.is_accepting():
            raise RequestError(f"the {what} grammar matches no output at all", param)
        if matcher.is_error():
            raise RequestError(f"unsupported {what}: {_clean(matcher.get_error())}", param)
        with self._lock:
            self._cache[grammar] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher


class _TextTokens:
    """The tokenizer as llguidance is to see it (its ``TokenizerWrapper`` protocol): the
    added tokens it takes as special (``<|im_end|>``, ``<think>``, ``<tool_call>``) special,
    and text encoded without any added token. llguidance keeps special tokens out of text
    (a grammar names one as ``<think>``); it spells out the text a grammar forces
    (``"<think>"`` in a JSON string) with the tokenizer, and the tokenizer's own encode
    would return the added token for it, which is special, so the matcher rejected the token
    its own mask allowed. Here the text comes back in ordinary tokens. Each token's bytes
    are llguidance's own reading of the tokenizer (its byte-level and metaspace rules), the
    added tokens' their text."""

    def __init__(self, backend: Any, eos: int | None, vocab_size: int) -> None:
        import llguidance
        from tokenizers import Tokenizer

        data = json.loads(backend.to_str())
        for token in data.get("added_tokens", []):
            token["special"] = True
        # Text is encoded as it stands, wherever it falls in the output: no "▁" or space
        # put before it (SentencePiece's Prepend normalizer and Metaspace's prepend scheme,
        # ByteLevel's prefix space), which llguidance's own reading also leaves out.
        data["normalizer"] = _without_prepend(data.get("normalizer"))
        data["pre_tokenizer"] = _without_prefix_space(data.get("pre_tokenizer"))
        self._encoder = Tokenizer.from_str(json.dumps(data))
        self._encoder.encode_special_tokens = True  # (their text as ordinary tokens)
        self._encoder.no_padding()
        self._encoder.no_truncation()
        reader = llguidance.LLTokenizer(backend.to_str())
        # One token a logit. Ids the tokenizer lacks (padded embeddings, gaps) are special
        # tokens no text has; ids past the model's logits are never sampled, so left out.
        added = backend.get_added_tokens_decoder()
        names = {i: t.content for i, t in added.items()}
        self.tokens = []
        for i in range(vocab_size):
            if i not in names:
                text = reader.decode_bytes([i]) if i < reader.vocab_size else b""
                if text:
                    self.tokens.append(text)
                    continue
                names[i] = f"<|fermi_no_token_{i}|>"
            self.tokens.append(names[i].encode())
        # Special: what llguidance's reading takes as special (an added token flagged so, or
        # one shaped like a tag: <think>, <|im_end|>) and the placeholders; an ordinary added
        # token ("\n\n") stays text.
        self.special_token_ids = sorted(
            i
            for i, name in names.items()
            if i < vocab_size
            and (i not in added or added[i].special or (name[:1] == "<" and name[-1:] == ">"))
        )
        self.eos_token_id = eos
        self.bos_token_id = None

    def __call__(self, text: str) -> list[int]:
        return self._encoder.encode(text, add_special_tokens=False).ids


def _without_prepend(normalizer: Any) -> Any:
    if not isinstance(normalizer, dict):
        return normalizer
    if normalizer.get("type") == "Prepend":
        return None
    if normalizer.get("type") == "Sequence":
        kept = [_without_prepend(n) for n in normalizer.get("normalizers", [])]
        return {**normalizer, "normalizers": [n for n in kept if n is not None]}
    return normalizer


def _without_prefix_space(pre: Any) -> Any:
    if not isinstance(pre, dict):
        return pre
    kind = pre.get("type")
    if kind == "Metaspace":
        return {**pre, "prepend_scheme": "never", "add_prefix_space": False}
    if kind == "ByteLevel":
        return {**pre, "add_prefix_space": False}
    if kind == "Sequence":
        return {**pre, "pretokenizers": [_without_prefix_space(p) for p in pre["pretokenizers"]]}
    return pre


def _clean(message: object) -> str:
    """The grammar compiler's message in one line: its first, without the position in the
    grammar text fermi wrote (the caller never saw that text), and the "error:" line of a
    multi-line report (a regex's: what is wrong, after a drawing of where); a word longer
    than 64 characters (a quoted pattern) cut to 60 and "…"."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "rejected by the grammar compiler"
    first = re.sub(r"^at \d+\(\d+\): ", "", lines[0])
    detail = next((line[6:].strip() for line in lines[1:] if line.startswith("error:")), "")
    said = f"{first} {detail}" if detail and detail not in first else first
    # The compiler quotes the caller's pattern or value whole: a long one is cut, so that
    # the reason after it survives the front ends' caps (gRPC's details: 1 KiB).
    return re.sub(r"\S{65,}", lambda m: m.group()[:60] + "…", said)
