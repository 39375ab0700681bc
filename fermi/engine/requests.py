"""Requests in: what a caller asks for, checked and resolved into a ``GenerationRequest``.

``SamplingSettings`` declares, once, every setting a caller may give about how a reply is
sampled and where it ends; the Python API, HTTP, gRPC and the CLI all hand one over.
``RequestBuilder`` renders the prompt (chat template, thinking mode), fits it to the context,
and resolves the settings against the model's generation defaults into the device-facing
``SamplingParams``. Every problem is a ``RequestError`` carrying the field and a code, raised
where it is found.
"""

from __future__ import annotations

import functools
import numbers
import operator
import typing
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, fields, replace
from typing import Any

from fermi.engine.types import GenerationRequest, Thinking
from fermi.errors import FermiError, RequestError, quoted
from fermi.grammar import Grammar, GrammarCompiler
from fermi.loading import GenerationDefaults
from fermi.sampling import MAX_LOGPROBS, SamplingParams
from fermi.text.control import strings
from fermi.text.nesting import check_nesting
from fermi.text.stops import MAX_STOP_CHARS, MAX_STOPS
from fermi.text.thinking import THINK_CLOSE, THINK_OPEN, ThinkingConvention
from fermi.text.tokenizer import Tokenizer
from fermi.text.tools import (
    HERMES_CLOSE,
    HERMES_OPEN,
    Tool,
    ToolChoice,
    ToolFormat,
    call_grammar,
    check_tools_supported,
    parse_tool_choice,
    parse_tools,
    tool_format,
)

THINKING_MODES: tuple[Thinking, ...] = ("on", "off", "auto")
# Temperatures below this are treated as greedy: dividing by them would overflow the logits.
MIN_TEMPERATURE = 1e-5
# Qwen3's recommended sampling when thinking is off (its generation_config holds the
# thinking-mode values); applied to templates with Qwen3's switch (``enable_thinking``, no
# system-prompt flags) when a request sets none of these four itself.
NON_THINKING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
# The roles a chat message may have: OpenAI's. Any other text would reach the chat template,
# and a role such as "user<|im_end|>..." would write its own turns into the prompt.
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How a reply is sampled and where it ends, as a caller asks for it.

    ``None`` leaves a setting to the model: its ``generation_config.json``, else the neutral
    value (``RequestBuilder.sampling`` says in which order). The fields named like
    ``SamplingParams``' are sampling parameters, whose ranges ``SamplingParams.validate``
    holds. Construction checks the types (callers from JSON or gRPC can get them wrong) and
    normalises them: numbers to ``int`` / ``float``, ``stop`` to a tuple.
    """

    max_tokens: int | None = None  # at least 1; None: up to the end of the context
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None  # (0, 1]
    top_k: int | None = None  # 0 = off
    min_p: float | None = None  # [0, 1], relative to the most likely token
    # HF semantics: divides the logits of prompt and generated tokens; (0, 100].
    repetition_penalty: float | None = None
    # OpenAI semantics, generated tokens only, [-2, 2]; None = 0.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None  # None: a random seed per request
    # Strings that end the reply, never part of it: at most MAX_STOPS of MAX_STOP_CHARS each.
    stop: str | Sequence[str] | None = None
    ignore_eos: bool = False  # keep generating past end-of-sequence
    # None: no logprobs; 0: the chosen token's; k (up to 20): also the k most likely.
    logprobs: int | None = None
    # Token id -> a number in [-100, 100] added to that token's logit before sampling
    # (OpenAI's logit_bias; ids may come as strings, as JSON object keys do).
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] | None = None

    def __post_init__(self) -> None:
        for name, kind in _KINDS.items():
            value = getattr(self, name)
            normal = _checked(name, kind, value)
            if normal is not value:
                object.__setattr__(self, name, normal)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(_KINDS)

    @classmethod
    def taken_from(cls, source: object, **values: Any) -> SamplingSettings:
        """The settings ``source`` (a request body) holds under their own names, with
        ``values`` for those its wire format names or shapes differently."""
        named = {n: getattr(source, n) for n in _KINDS if n not in values and hasattr(source, n)}
        return cls(**named, **values)

    @classmethod
    def of(cls, settings: SamplingSettings | Mapping[str, Any] | None) -> SamplingSettings:
        """``Engine.build_request``'s ``settings=``: these settings, a dict of their fields,
        or None (the defaults); anything else is a TypeError."""
        if settings is None:
            return cls()
        if isinstance(settings, SamplingSettings):
            return settings
        if isinstance(settings, Mapping):
            return cls().updated(settings, "settings")
        raise TypeError(
            f"settings must be a SamplingSettings or a dict of its fields, not "
            f"{type(settings).__name__}"
        )

    def updated(
        self, values: Mapping[str, Any], where: str = "build_request()"
    ) -> SamplingSettings:
        """These settings with ``values`` (keyword arguments of ``Engine.build_request``);
        a value of None leaves the setting as it is (not given)."""
        unknown = [name for name in values if name not in _KINDS]
        if unknown:
            raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r}")
        given = {name: value for name, value in values.items() if value is not None}
        return replace(self, **given) if given else self


def _checked(name: str, kind: type, value: Any) -> Any:
    """``value`` of the setting ``name`` in its normal form; RequestError if mistyped."""
    if kind is bool:
        if not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false, not {value!r}", name, "invalid_type")
        return value
    if value is None:
        return None
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise RequestError(f"{name} must be an integer, not {value!r}", name, "invalid_type")
        return value if type(value) is int else int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RequestError(f"{name} must be a number, not {value!r}", name, "invalid_type")
        return value if type(value) is float else float(value)
    if kind is Mapping:
        return _bias(name, value)
    stops = (value,) if isinstance(value, str) else value
    if isinstance(stops, Iterable) and not isinstance(stops, Mapping):
        stops = tuple(stops)
    if isinstance(stops, tuple) and len(stops) > MAX_STOPS:
        raise RequestError(f"stop takes at most {MAX_STOPS} strings, not {len(stops)}", name)
    if not isinstance(stops, tuple) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", name, "invalid_type")
    if any(s == "" for s in stops):
        raise RequestError("stop strings must not be empty", name)
    longest = max(stops, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise RequestError(
            f"stop strings are at most {MAX_STOP_CHARS} characters long, not {len(longest)}", name
        )
    return stops


def _bias(name: str, value: Any) -> tuple[tuple[int, float], ...]:
    """A logit bias as sorted (token id, bias) pairs (which it also takes, as normalised)."""
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        value = dict(value)
    if not isinstance(value, Mapping):
        raise RequestError(f"{name} must map token ids to numbers", name, "invalid_type")
    pairs = {}
    for key, bias in value.items():
        digits = isinstance(key, str) and key.strip().isascii() and key.strip().isdigit()
        token = int(key) if digits else key  # ("²" is a digit to isdigit, not to int)
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise RequestError(f"{name} keys must be token ids, not {key!r}", name, "invalid_type")
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real):
            raise RequestError(f"{name} values must be numbers, not {bias!r}", name, "invalid_type")
        if not -100.0 <= bias <= 100.0:
            raise RequestError(f"{name} values must be in [-100, 100], got {bias!r}", name)
        pairs[int(token)] = float(bias)
    return tuple(sorted(pairs.items()))


def _kind(hint: Any) -> type:
    """The type a setting's annotation declares: int, float, bool, Sequence (stop) or
    Mapping (logit_bias)."""
    args = typing.get_args(hint) or (hint,)
    if any(typing.get_origin(a) is Mapping for a in args):
        return Mapping
    return next(t for t in (bool, int, float) if t in args) if str not in args else Sequence


_KINDS: dict[str, type] = {
    f.name: _kind(typing.get_type_hints(SamplingSettings)[f.name]) for f in fields(SamplingSettings)
}
# The settings that are sampling parameters (the rest end the reply or shape the output).
_SAMPLED = tuple(f.name for f in fields(SamplingParams))
DEFAULT_SETTINGS = SamplingSettings()


@dataclass(frozen=True)
class ChatPrompt:
    token_ids: list[int]
    text: str
    start_in_reasoning: bool  # the prompt opened <think>: the output starts in the reasoning
    thinking: Thinking
    may_open: bool = False  # the model may open a <think> block at the start of its output


class RequestBuilder:
    """Builds the requests of one model: its tokenizer, generation defaults and limits."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        generation: GenerationDefaults,
        vocab_size: int,
        max_seq_len: int,
        grammars: GrammarCompiler | None = None,
        model_name: str = "this model",
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.generation = generation
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.grammars = grammars
        self._tool_format: tuple[str | None, ToolFormat | None] = ("", None)
        self._thinking: tuple[str | None, ThinkingConvention | None] = ("", None)

    @property
    def thinking(self) -> ThinkingConvention:
        """How the chat template switches thinking (read once per template)."""
        template = self.tokenizer.chat_template
        if self._thinking[0] != template or self._thinking[1] is None:
            self._thinking = (template, ThinkingConvention.of(self.tokenizer))
        return self._thinking[1]

    @property
    def supports_thinking(self) -> bool:
        return self.thinking.can_think

    @property
    def tool_format(self) -> ToolFormat | None:
        """The tool-call syntax the chat template teaches; None: no tool support."""
        template = self.tokenizer.chat_template
        if self._tool_format[0] != template:
            self._tool_format = (template, tool_format(template))
        return self._tool_format[1]

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Characters past which no prompt fits the context, however it tokenises: a token
        covers at most the longest vocabulary entry's characters (a byte-level entry has
        one per byte, at least as many as the text's characters), times 4 for normalisers
        that compose characters (NFC makes one of up to four)."""
        return self.max_seq_len * self.tokenizer.max_token_chars * 4

    def chat_prompt(
        self,
        messages: Sequence[dict],
        thinking: Thinking = "auto",
        tools: Sequence[dict | Tool] | None = None,
    ) -> ChatPrompt:
        """Render ``messages`` (and ``tools``, OpenAI's shape) with the model's chat template
        for a thinking mode."""
        return self._chat_prompt(messages, thinking, tools, bounded=False)

    def _chat_prompt(
        self,
        messages: Sequence[dict],
        thinking: Thinking,
        tools: Sequence[dict | Tool] | None,
        bounded: bool,
    ) -> ChatPrompt:
        _check_thinking(thinking)
        check_nesting(messages, "messages")
        check_roles(messages)
        listed = [t.as_openai() for t in parse_tools(list(tools))] if tools else None
        check_nesting(listed, "tools")
        # OpenAI's "developer" is the system role of its newer models: templates know only
        # "system" (Qwen3's drops any other role; others render a role the model never saw).
        messages = [
            {**m, "role": "system"} if m.get("role") == "developer" else m for m in messages
        ]

        # The caller's text that spells a control token is kept text (fermi.text.control).
        # Not an assistant turn's: the model's own words sent back, which templates read
        # for their think and tool-call tags (Qwen3's drops a past turn's reasoning).
        theirs = [i for i, m in enumerate(messages) if m.get("role") != "assistant"]
        searched = ([messages[i] for i in theirs], listed)
        if bounded:  # before searching them (the prompt holds them all, unless the template
            # drops one; not the assistant turns, whose dropped reasoning may be long)
            self._check_chars(_chars(searched), "messages")
        (masked_messages, listed), masked = self.tokenizer.control.mask(searched)
        if masked is not None:
            messages = list(messages)
            for i, message in zip(theirs, masked_messages, strict=True):
                messages[i] = message

        def render(messages: Sequence[Mapping[str, Any]], variables: dict[str, Any]) -> str:
            try:
                return self.tokenizer.apply_chat_template(
                    list(messages), add_generation_prompt=True, tools=listed, **variables
                )
            except FermiError:
                raise
            except ValueError as exc:
                raise RequestError(str(exc), "messages") from None

        rendered = self.thinking.prompt(render, messages, thinking, self.model_name)
        text = rendered.text
        if masked is None:
            ids = self._encode(text, False, "messages" if bounded else None)
        else:
            self._check_chars(text, "messages" if bounded else None)
            try:
                ids, text = self.tokenizer.control.encode(text, masked)
            except ValueError as exc:
                raise RequestError(str(exc), "messages") from None
        return ChatPrompt(ids, text, rendered.start_in_reasoning, thinking, rendered.may_open)

    def _encode(self, text: str, add_special_tokens: bool, bounded: str | None) -> list[int]:
        """``text``'s token ids; with ``bounded`` (the prompt's field), a text too long for
        any tokenisation of it to fit the context is refused before tokenising it (seconds
        of CPU for megabytes of text)."""
        self._check_chars(text, bounded)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_chars(self, text: str | int, bounded: str | None) -> None:
        """A prompt of ``text`` (or of that many characters) can fit the context."""
        chars = text if isinstance(text, int) else len(text)
        if bounded is not None and chars > self.max_prompt_chars:
            raise RequestError(
                f"the prompt has {chars} characters, more than this engine's context of "
                f"{self.max_seq_len} tokens can hold",
                bounded,
                "context_length_exceeded",
                hint="pass truncate=True to keep the end of the prompt",
            )

    def build(
        self,
        *,
        messages: Sequence[dict] | None = None,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        settings: SamplingSettings = DEFAULT_SETTINGS,
        thinking: Thinking = "auto",
        truncate: bool = False,
        skip_special_tokens: bool = True,
        tools: Sequence[dict | Tool] | None = None,
        tool_choice: str | dict | ToolChoice | None = None,
        parallel_tool_calls: bool | None = None,
        grammar: Grammar | dict | None = None,
        response_format: dict | None = None,
    ) -> GenerationRequest:
        """Validate and resolve a request; raises :class:`RequestError` naming the field.

        ``response_format`` (OpenAI's shapes) or ``grammar`` (a :class:`Grammar`, or
        ``{"type": "json_schema"|"json_object"|"regex"|"lark", "value": ...}``) constrain
        the output; the grammar is compiled here, so a schema it cannot enforce is refused
        before the request is queued. A ``required`` or named ``tool_choice`` constrains it
        to calls of the tools."""
        if not isinstance(skip_special_tokens, bool):
            raise RequestError(
                f"skip_special_tokens must be true or false, not {quoted(skip_special_tokens)}",
                "skip_special_tokens",
                "invalid_type",
            )
        if not isinstance(truncate, bool):
            raise RequestError(
                f"truncate must be true or false, not {quoted(truncate)}",
                "truncate",
                "invalid_type",
            )
        if messages is None and thinking != "auto":
            raise RequestError(
                "thinking applies to chat messages; a raw prompt is not rendered with the chat "
                "template, so it cannot be switched on or off",
                "thinking",
            )
        given = sum(x is not None for x in (messages, prompt, prompt_token_ids))
        if given != 1:
            code = "missing_required_parameter" if given == 0 else "invalid_value"
            raise RequestError(
                "pass exactly one of messages, prompt, prompt_token_ids", "messages", code
            )
        _check_thinking(thinking)
        constraint = self._grammar(grammar, response_format)
        listed = parse_tools(list(tools) if tools is not None else None)
        choice = parse_tool_choice(tool_choice, listed)
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise RequestError(
                "parallel_tool_calls must be true or false", "parallel_tool_calls", "invalid_type"
            )
        if parallel_tool_calls is not None and not listed:
            raise RequestError(  # (as OpenAI's API: it would change nothing)
                "parallel_tool_calls needs tools", "parallel_tool_calls"
            )
        parallel = parallel_tool_calls is not False
        fmt = self.tool_format if listed and choice.mode != "none" else None
        if listed:
            check_tools_supported(self.tool_format, listed, choice)
        if listed and messages is None:
            raise RequestError("tools need a chat request (messages)", "tools")
        split, start_in_reasoning, may_open = False, False, False
        if messages is not None:
            if not messages:
                raise RequestError("messages must not be empty", "messages")
            chat = self._chat_prompt(messages, thinking, listed, bounded=not truncate)
            ids, split, start_in_reasoning = chat.token_ids, True, chat.start_in_reasoning
            may_open = chat.may_open
            if fmt is not None and choice.mode in ("required", "named"):
                if constraint is not None:
                    raise RequestError(
                        f"tool_choice {choice.mode} constrains the output itself; "
                        "it cannot be combined with a grammar or response_format",
                        "tool_choice",
                    )
                constraint = self._call_grammar(fmt, listed, choice, parallel)
                self._check(constraint, "tools", "tool parameters schema")
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise RequestError("prompt must be a string", "prompt", "invalid_type")
            check_text(prompt, "prompt")
            ids = self._encode(prompt, True, None if truncate else "prompt")
        else:
            sized = isinstance(prompt_token_ids, Sized)
            if sized and not truncate and len(prompt_token_ids) >= self.max_seq_len:
                raise _over_context(len(prompt_token_ids), self.max_seq_len, "prompt_token_ids")
            ids = self._token_ids(prompt_token_ids)
        if not ids:
            raise RequestError("the prompt is empty", _input_field(messages, prompt))
        if constraint is not None and settings.stop:
            # A stop string met inside the grammar's output would end it unfinished, and the
            # reply would still finish "stop": the grammar decides where the reply ends.
            raise RequestError(
                "stop strings cannot be combined with a constrained reply (response_format, "
                "a grammar, or a required or named tool_choice): the grammar ends it",
                "stop",
            )

        max_tokens = settings.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise RequestError("max_tokens must be at least 1", "max_tokens")
        limit = self.max_seq_len
        if len(ids) >= limit:
            if not truncate:
                raise _over_context(len(ids), limit, _input_field(messages, prompt))
            # Leave room for max_tokens (without it, a quarter of the context), but keep at
            # least half of the context of the prompt: a max_tokens near the context would
            # otherwise keep one prompt token of it (max_tokens is then cut to what is left).
            keep = max(limit // 2, limit - (max_tokens or max(1, limit // 4)), 1)
            ids = ids[-keep:]
        budget = limit - len(ids)
        max_tokens = budget if max_tokens is None else min(max_tokens, budget)

        params = self.sampling(settings, thinking if messages is not None else "auto")
        logprobs = settings.logprobs
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
        return GenerationRequest(
            prompt_ids=tuple(ids),
            params=params,
            max_tokens=max_tokens,
            stop=settings.stop or (),
            eos_token_ids=frozenset(self.generation.eos_token_ids),
            ignore_eos=settings.ignore_eos,
            split_reasoning=split,
            start_in_reasoning=start_in_reasoning,
            answer_tags=self.thinking.answer_tags if split else None,
            logprobs=logprobs,
            skip_special_tokens=skip_special_tokens,
            logit_bias=self._logit_bias(settings),
            grammar=constraint,
            # (a cache hit: the constraint was compiled above)
            compiled_grammar=self._check(constraint, "grammar") if constraint else None,
            reasoning_may_open=constraint is not None and may_open,
            tool_format=fmt,
            parallel_tool_calls=parallel,
            tool_calls_forced=fmt is not None and choice.mode in ("required", "named"),
        )

    def _grammar(self, grammar: Grammar | dict | None, response_format: Any) -> Grammar | None:
        if grammar is not None and response_format is not None:
            raise RequestError("give grammar or response_format, not both", "response_format")
        if grammar is not None:
            constraint, param = Grammar.parse(grammar), "grammar"
        elif response_format is not None:
            constraint = Grammar.from_response_format(response_format)
            param = "response_format"
        else:
            return None
        if constraint is not None:
            self._check(constraint, param)
        return constraint

    def _check(self, grammar: Grammar, param: str, what: str | None = None) -> Any:
        if self.grammars is None:
            raise RequestError("this engine cannot constrain its output", param)
        return self.grammars.check(grammar, param, what)

    def _call_grammar(
        self, fmt: ToolFormat, tools: tuple[Tool, ...], choice: ToolChoice, parallel: bool
    ) -> Grammar:
        """The grammar of a required or named call. It holds no think block: the engine
        leaves reasoning unconstrained and applies the grammar from its end."""
        added = {t.content for t in self.tokenizer.backend.get_added_tokens_decoder().values()}
        tokens = frozenset({HERMES_OPEN, HERMES_CLOSE, THINK_OPEN, THINK_CLOSE} & added)
        return call_grammar(fmt, tools, choice, parallel, "none", tokens)

    def _logit_bias(self, settings: SamplingSettings) -> tuple[tuple[int, float], ...]:
        pairs = settings.logit_bias or ()
        vocab = self.vocab_size
        bad = [t for t, _ in pairs if not 0 <= t < vocab]  # type: ignore[union-attr]
        if bad:
            raise RequestError(
                f"logit_bias names token id {bad[0]}, outside the vocabulary (0..{vocab - 1})",
                "logit_bias",
            )
        return tuple(pairs)  # type: ignore[arg-type]

    def sampling(self, settings: SamplingSettings, thinking: Thinking = "auto") -> SamplingParams:
        """The sampling parameters of a request. Each one is the first of: the caller's
        setting; Qwen3's non-thinking values, when thinking is off on a template with
        Qwen3's switch and the caller set none of temperature, top_p, top_k and min_p; the
        model's generation_config (where ``do_sample: false`` means greedy);
        ``SamplingParams``' neutral default."""
        given = {n: v for n in _SAMPLED if (v := getattr(settings, n)) is not None}
        chose_filters = NON_THINKING_DEFAULTS.keys() & given
        qwen3_switch = self.thinking.switch == "enable_thinking" and not self.thinking.system_flags
        if thinking == "off" and qwen3_switch and not chose_filters:
            given = {**NON_THINKING_DEFAULTS, **given}
        values = {**self._model_defaults(), **given}
        if 0.0 < values.get("temperature", 1.0) < MIN_TEMPERATURE:
            values["temperature"] = 0.0
        params = SamplingParams(**values)
        try:
            params.validate()
        except ValueError as exc:
            raise RequestError(str(exc), _invalid_field(params)) from None
        return params

    def _model_defaults(self) -> dict[str, Any]:
        """The sampling parameters ``generation_config.json`` sets, as numbers."""
        gen = self.generation
        values = {n: v for n in _SAMPLED if (v := getattr(gen, n, None)) is not None}
        if gen.do_sample is False:
            values["temperature"] = 0.0
        return {n: _KINDS[n](v) for n, v in values.items()}

    def _token_ids(self, prompt_token_ids: Sequence[int]) -> list[int]:
        try:  # integers only (numpy's and torch's too): not 1.9, "12" or True
            if isinstance(prompt_token_ids, str | bytes | bytearray | memoryview):
                raise TypeError  # (bytes iterate as ints: they would pass as token ids)
            given = list(prompt_token_ids)  # (read once: a generator would be used up)
            if any(isinstance(t, bool) for t in given):
                raise TypeError
            ids = [operator.index(t) for t in given]
        except TypeError:
            raise RequestError(
                "prompt_token_ids must be a list of integers", "prompt_token_ids", "invalid_type"
            ) from None
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                "prompt_token_ids",
            )
        return ids


def _chars(value: Any) -> int:
    """The characters of every string in ``value`` (strings, lists and mappings)."""
    return sum(map(len, strings(value)))


def check_text(text: str, field: str) -> None:
    """Refuse a string with an unpaired UTF-16 surrogate (``"\\ud800"`` without its pair):
    it is no text, and the tokenizer would fail on it with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        point = ord(text[exc.start])
        why = "half of a UTF-16 pair is not text"
        if 0xDC80 <= point <= 0xDCFF:  # how Python keeps a byte it could not decode
            byte = point - 0xDC00
            why += f" (Python's spelling of the byte 0x{byte:02X} in input that is not UTF-8)"
        raise RequestError(
            f"{field} holds an unpaired surrogate, U+{point:04X} at character {exc.start}: {why}",
            field,
        ) from None


def check_roles(messages: Sequence[Any], field: str = "messages") -> None:
    """Refuse a message that is not a mapping with one of ``ROLES`` as its role; ``field``
    is the messages' name on the caller's wire (gRPC: ``conversation.messages``)."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise RequestError(
            f"{field} must be a list of messages (objects with a role and content), "
            f"not {type(messages).__name__}",
            field,
            "invalid_type",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(
                f"a message is an object with a role and content, not {type(message).__name__}",
                f"{field}[{i}]",
                "invalid_type",
            )
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                f"role must be one of {', '.join(ROLES)}, not {quoted(role)}", f"{field}[{i}].role"
            )
        _check_content(message.get("content"), role, f"{field}[{i}].content")


def _check_content(content: Any, role: str, field: str) -> None:
    """A message's content is text: a string or a list of text parts (an assistant turn
    that calls tools may have none). Anything else is refused, not dropped unseen: the
    engine reads no images, audio or files."""
    if content is None:
        if role != "assistant":
            raise RequestError(
                f"a {role} message needs content", field, "missing_required_parameter"
            )
        return
    if isinstance(content, str):
        check_text(content, field)
        return
    if not isinstance(content, list):
        raise RequestError(
            f"content must be a string or a list of text parts, not {type(content).__name__}",
            field,
            "invalid_type",
        )
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a part of type {quoted(kind)}" if kind else "a part that is not a text part"
            raise RequestError(
                f"{what} is not supported: this engine reads text parts "
                '({"type": "text", "text": ...}) only',
                f"{field}[{j}]",
            )
        check_text(part["text"], f"{field}[{j}].text")


def check_room(request: GenerationRequest, asked: int | None, field: str = "max_tokens") -> None:
    """Refuse a request whose prompt leaves less room than the ``asked`` tokens: the builder
    clamps them to the context (the Python API's convenience); an HTTP or gRPC client
    that asked for more than fits must know. ``field`` names the limit on the wire."""
    if asked is None or request.max_tokens >= asked:
        return
    n = len(request.prompt_ids)
    context = n + request.max_tokens
    raise RequestError(
        f"this model's context is {context} tokens; the prompt has {n} tokens "
        f"and {field} asks for {asked} more ({n + asked} in all). "
        f"Lower {field} to {context - n} or shorten the prompt.",
        field,
        "context_length_exceeded",
    )


def _input_field(messages: object, prompt: object) -> str:
    """The keyword a request's input came in: an error about the input names it."""
    if messages is not None:
        return "messages"
    return "prompt" if prompt is not None else "prompt_token_ids"


def _over_context(tokens: int, limit: int, field: str) -> RequestError:
    return RequestError(
        f"the prompt has {tokens} tokens; this engine's context is {limit}",
        field,
        "context_length_exceeded",
        hint="pass truncate=True to keep the end of the prompt",
    )


def _check_thinking(thinking: object) -> None:
    if thinking not in THINKING_MODES:
        raise RequestError(f"thinking must be on, off or auto, not {thinking!r}", "thinking")


def _invalid_field(params: SamplingParams) -> str | None:
    """The field ``params.validate`` refused: the first one that fails on its own (the
    others keep their neutral defaults), so the check's message is never parsed."""
    for name in _SAMPLED:
        try:
            SamplingParams(**{name: getattr(params, name)}).validate()
        except ValueError:
            return name
    return None
