"""Data that crosses the engine's seams: requests in, deltas and completions out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fermi.errors import FermiError, RequestError
from fermi.grammar import Grammar
from fermi.sampling import SamplingParams
from fermi.text.stops import StopStrings
from fermi.text.thinking import Thinking as Thinking  # (re-exported: the mode type)
from fermi.text.tools import ToolCall, ToolCallDelta, ToolFormat

# tool_calls: the reply ended (eos, a stop string, its grammar complete) after calling tools.
FinishReason = Literal["stop", "length", "cancelled", "error", "tool_calls"]


@dataclass(frozen=True)
class GenerationRequest:
    """A fully prepared request: token ids already templated, parameters resolved."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    # Split <think>...</think> from the answer (chat requests); True when the prompt
    # itself already opened the think block.
    split_reasoning: bool = False
    start_in_reasoning: bool = False
    # Tags the answer comes wrapped in after the reasoning, dropped from it (Granite 3.3's
    # <response>, </response>); None: the answer is bare.
    answer_tags: tuple[str, str] | None = None
    # None: no logprobs; 0: the chosen token's; k: also the k most likely alternatives.
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Keep the slot's KV cache under this key when the request ends; a later request with
    # the same key starts from the longest prefix it shares with that cache.
    # Engine.release_session(key) drops it; so does the scheduler when it needs the slot.
    session: str | None = None
    # The output must match this grammar (structured outputs, required tool calls): each
    # token is sampled from the ones it allows, and the request ends when it is complete.
    # Reasoning is not constrained: with ``reasoning_may_open`` (a chat request on a
    # thinking model, thinking not off) the first token may also open a think block, and
    # the grammar applies from the end of the reasoning.
    grammar: Grammar | None = None
    # The grammar as the engine that built the request compiled it (opaque): its matcher is
    # a copy, so the engine's thread never compiles. Without it, the engine compiles.
    compiled_grammar: Any = field(default=None, compare=False, repr=False)
    reasoning_may_open: bool = False
    # Parse tool calls in this syntax out of the answer (set when the request has tools and
    # tool_choice is not "none"); without parallel calls, only the first call is kept.
    tool_format: ToolFormat | None = None
    parallel_tool_calls: bool = True
    # tool_choice required or named: the grammar lets the answer be calls only, so what
    # the parser cannot read as one (a call cut off before its name) is dropped, not
    # returned as content.
    tool_calls_forced: bool = False
    # ``stop`` as one automaton, built with the request (off the engine thread) and shared
    # by its copies (the n choices of one prompt); built from ``stop`` when not given.
    stop_strings: StopStrings | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.stop_strings is None or self.stop_strings.given != self.stop:
            object.__setattr__(self, "stop_strings", StopStrings(self.stop))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens whose KV came from a session's cache instead of a prefill.
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability; a generated token's also has the most likely
    alternatives at its step (``top``, most likely first).

    ``token_bytes`` are the token's own bytes, which may be part of a character (a byte
    of an emoji): joined in order, the listed tokens' bytes spell the reply (but for the
    end-of-sequence token, and a token that runs on into the stop string that ended it).
    ``token`` is its text (``fermi.text.token_bytes.token_text``: ``bytes:`` and ``\\xNN``
    escapes where the bytes are not whole characters)."""

    token_id: int
    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TokenLogprob, ...] = ()
    # Where the token's text starts in the reply's text, in characters (the character that
    # holds its first byte; a token with no text of its own, such as a skipped special
    # token, starts where the next text does); None for an alternative.
    text_offset: int | None = None


@dataclass
class Delta:
    """One step of output. The last delta of a request has ``finish_reason`` and ``usage``."""

    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None
    # What kind of error, where a front end answers it otherwise than as the server's fault:
    # "grammar_limit" (the request's grammar cost more than fermi.grammar.LIMITS allow).
    error_code: str | None = None
    # Tool calls as they stream: a call's first piece has its id and name, the following
    # ones fragments of its arguments' JSON text.
    tool_calls: list[ToolCallDelta] | None = None
    # On the last delta: the stop string that ended the reply (None: another reason).
    stop_string: str | None = None

    def exception(self) -> FermiError:
        """What a caller gets for an error delta: a grammar past its limits is the
        request's fault (a ``RequestError``, which HTTP answers 400 and gRPC
        INVALID_ARGUMENT); anything else is the engine's (a ``FermiError``)."""
        if self.error_code == "grammar_limit":
            # No param: the grammar came from response_format, tools or grammar=.
            return RequestError(self.error or "", None, "grammar_too_complex")
        return FermiError(f"generation failed: {self.error}")


@dataclass
class Completion:
    text: str
    reasoning: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    # Seconds from submission to the first token, and from the first token to the last.
    time_to_first_token: float = 0.0
    decode_time: float = 0.0
    tool_calls: list[ToolCall] = field(default_factory=list)
