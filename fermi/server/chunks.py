"""Engine deltas -> OpenAI bodies: streamed chunks and whole responses, per choice.

These classes hold the per-request state the mapping needs (role sent, logprobs not
yet attached, text gathered so far) and nothing else, so they are tested without a server.

A streamed token is usually text alone. Its event is then spliced into a template: the
chunk encoded once per choice with a marker for the text, split at the marker, and joined
with the JSON-encoded text (one C call). The bytes are those of the encoded chunk; the
saving matters because this runs for every token on the engine thread, right after the
model step, where caches are cold and each Python call costs ~10x its hot-loop time
(perf/notes_serve.md).
"""

from __future__ import annotations

from fermi.engine.types import Delta, TokenLogprob
from fermi.server.protocol import (
    ENCODER,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatTokenLogprob,
    ChunkDelta,
    ChunkFunction,
    ChunkToolCall,
    CompletionLogprobs,
    FunctionCall,
    PromptTokensDetails,
    TextChoice,
    TextCompletion,
    ToolCallBody,
    TopLogprob,
    UsageBody,
)
from fermi.text.token_bytes import char_offsets
from fermi.text.tools import ToolCall, ToolCallDelta, merge_calls

# JSON has no -inf; OpenAI reports impossible tokens with this floor.
LOGPROB_FLOOR = -9999.0

# Server-sent events: one ``data:`` line per chunk, a blank line after it.
SSE_PREFIX, SSE_END = b"data: ", b"\n\n"
_MARK = "\x00fermi-text\x00"
_MARK_JSON = ENCODER.encode(_MARK)


def sse(obj) -> bytes:
    """One event: a JSON-encoded body framed as server-sent ``data:``."""
    return SSE_PREFIX + ENCODER.encode(obj) + SSE_END


def _template(obj) -> list[bytes]:
    """``sse(obj)`` split where the marker text stands; ``ENCODER.encode(text).join(parts)``
    then equals ``sse(obj)`` with the text in the marker's place(s)."""
    parts = sse(obj).split(_MARK_JSON)
    assert len(parts) > 1, "the template has no marker"
    return parts


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows stop, length and tool_calls; a cancelled request ended early, which
    reads as stop."""
    if reason is None:
        return None
    return reason if reason in ("length", "tool_calls") else "stop"


def tool_call_bodies(calls: list[ToolCall]) -> list[ToolCallBody] | None:
    if not calls:
        return None
    return [ToolCallBody(id=c.id, function=FunctionCall(c.name, c.arguments)) for c in calls]


def chunk_tool_calls(deltas: list[ToolCallDelta]) -> list[ChunkToolCall]:
    return [
        ChunkToolCall(d.index, d.id, "function", ChunkFunction(d.name, d.arguments))
        if d.id is not None
        else ChunkToolCall(d.index, function=ChunkFunction(arguments=d.arguments))
        for d in deltas
    ]


def _lp(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    """OpenAI's shape: each token's ``bytes`` are its own, part of a character or not."""
    return ChatLogprobs(
        [
            ChatTokenLogprob(
                t.token,
                _lp(t.logprob),
                list(t.token_bytes),
                [TopLogprob(a.token, _lp(a.logprob), list(a.token_bytes)) for a in t.top],
            )
            for t in items
        ]
    )


def completion_logprobs(
    items: list[TokenLogprob], offset: int, with_top: bool
) -> tuple[CompletionLogprobs, int]:
    """Legacy completions shape, and the offset after its tokens. Offsets count characters
    of the text: where the engine placed each token in the reply's text, else counted
    from ``offset`` by the tokens' bytes (``char_offsets``)."""
    offsets, offset = char_offsets((t.token_bytes for t in items), offset)
    if items and all(t.text_offset is not None for t in items):
        offsets = [t.text_offset for t in items]
    top = [{a.token: _lp(a.logprob) for a in t.top} for t in items] if with_top else None
    body = CompletionLogprobs(
        [t.token for t in items], [_lp(t.logprob) for t in items], top, offsets
    )
    return body, offset


def usage_body(prompt_tokens: int, choices: list[ChoiceText], n: int) -> UsageBody:
    """Each prompt counts once (its ``n`` choices share it): its first choice's cache hit."""
    completion = sum(c.tokens for c in choices)
    cached = PromptTokensDetails(sum(c.cached for c in choices[::n]))
    return UsageBody(prompt_tokens, completion, prompt_tokens + completion, cached)


class ChoiceText:
    """Everything one choice produced, for a non-streaming response."""

    __slots__ = (
        "cached",
        "calls",
        "finish_reason",
        "logprobs",
        "reasoning",
        "stop_string",
        "text",
        "tokens",
    )

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.stop_string: str | None = None  # the stop string that ended it, if one did
        self.tokens = 0
        self.cached = 0

    def add(self, delta: Delta) -> None:
        if delta.text:
            self.text.append(delta.text)
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.tool_calls:
            self.calls = merge_calls(self.calls, delta.tool_calls)
        self.end(delta)

    def end(self, delta: Delta) -> None:
        """Record how the choice ended, if ``delta`` is its last. A stream records only
        this: the last delta's call pieces may continue calls begun in earlier deltas."""
        if delta.finish_reason is not None:
            self.finish_reason = finish_reason(delta.finish_reason)
            self.stop_string = delta.stop_string
            self.tokens = delta.usage.completion_tokens if delta.usage else 0
            self.cached = delta.usage.cached_tokens if delta.usage else 0


def chat_completion(
    rid: str,
    created: int,
    model: str,
    choices: list[ChoiceText],
    prompt_tokens: int,
    want_logprobs: bool,
    n: int = 1,
    fingerprint: str | None = None,
) -> ChatCompletion:
    out = []
    for i, c in enumerate(choices):
        reasoning = "".join(c.reasoning) or None
        text = "".join(c.text)
        # OpenAI's content is null in a reply that only calls tools.
        content = None if c.calls and not text else text
        calls = tool_call_bodies(c.calls)
        message = AssistantMessage("assistant", content, reasoning, reasoning, calls)
        lps = chat_logprobs(c.logprobs) if want_logprobs else None
        out.append(ChatChoice(i, message, lps, c.finish_reason))
    usage = usage_body(prompt_tokens, choices, n)
    return ChatCompletion(
        id=rid,
        created=created,
        model=model,
        system_fingerprint=fingerprint,
        choices=out,
        usage=usage,
    )


def text_completion(
    rid: str,
    created: int,
    model: str,
    choices: list[ChoiceText],
    prompt_tokens: int,
    logprobs: int | None,
    n: int = 1,
    fingerprint: str | None = None,
) -> TextCompletion:
    out = []
    for i, c in enumerate(choices):
        lps = None
        if logprobs is not None:
            lps, _ = completion_logprobs(c.logprobs, 0, bool(logprobs))
        out.append(TextChoice(i, "".join(c.text), lps, c.finish_reason))
    usage = usage_body(prompt_tokens, choices, n)
    return TextCompletion(
        id=rid,
        created=created,
        model=model,
        system_fingerprint=fingerprint,
        choices=out,
        usage=usage,
    )


class ChatChunker:
    """Deltas of ``n`` choices -> ``chat.completion.chunk``s with one id and created."""

    def __init__(
        self,
        rid: str,
        created: int,
        model: str,
        n: int,
        want_logprobs: bool,
        fingerprint: str | None = None,
    ) -> None:
        self.rid, self.created, self.model = rid, created, model
        self.fingerprint = fingerprint
        self.want_logprobs = want_logprobs
        # Logprobs of tokens whose text is still held back (stop strings, tags) ride along
        # with the next chunk that is sent, so none are lost and none are duplicated.
        self.pending: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self._cache: dict[int, tuple[list[bytes], list[bytes]]] = {}

    def _chunk(self, choices: list[ChatChunkChoice], usage: UsageBody | None = None):
        return ChatCompletionChunk(
            id=self.rid,
            created=self.created,
            model=self.model,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=usage,
        )

    def first(self) -> list[ChatCompletionChunk]:
        """The opening chunks: each choice announces the assistant role (one chunk per
        choice, as OpenAI streams them)."""
        return [
            self._chunk([ChatChunkChoice(i, ChunkDelta(role="assistant", content=""))])
            for i in range(len(self.pending))
        ]

    def delta(self, index: int, delta: Delta) -> ChatCompletionChunk | None:
        """The chunk for one delta, or None when it carries nothing to send yet."""
        pending = self.pending[index]
        if self.want_logprobs and delta.logprobs:
            pending.extend(delta.logprobs)
        reason = finish_reason(delta.finish_reason)
        if not (delta.text or delta.reasoning or reason or delta.tool_calls):
            return None
        body = ChunkDelta(
            content=delta.text or None,
            reasoning_content=delta.reasoning or None,
            reasoning=delta.reasoning or None,
            tool_calls=chunk_tool_calls(delta.tool_calls) if delta.tool_calls else None,
        )
        lps = None
        if pending:
            lps = chat_logprobs(pending)
            self.pending[index] = []
        return self._chunk([ChatChunkChoice(index, body, lps, reason)])

    def usage(self, usage: UsageBody) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def event(self, index: int, delta: Delta) -> bytes:
        """``sse(self.delta(index, delta))``, or b"" when there is nothing to send yet."""
        plain = not (self.pending[index] or (self.want_logprobs and delta.logprobs))
        if plain and delta.finish_reason is None and not delta.tool_calls:
            text, reasoning = delta.text, delta.reasoning
            if text and not reasoning:
                return ENCODER.encode(text).join(self._templates(index)[0])
            if reasoning and not text:
                return ENCODER.encode(reasoning).join(self._templates(index)[1])
        chunk = self.delta(index, delta)
        return b"" if chunk is None else sse(chunk)

    def _templates(self, index: int) -> tuple[list[bytes], list[bytes]]:
        """(text alone, reasoning alone) templates of choice ``index``, built once."""
        found = self._cache.get(index)
        if found is None:
            text = ChunkDelta(content=_MARK)
            reasoning = ChunkDelta(reasoning_content=_MARK, reasoning=_MARK)
            found = self._cache[index] = (
                _template(self._chunk([ChatChunkChoice(index, text)])),
                _template(self._chunk([ChatChunkChoice(index, reasoning)])),
            )
        return found


class TextChunker:
    """Deltas of ``n`` choices -> streamed ``text_completion`` objects."""

    def __init__(
        self,
        rid: str,
        created: int,
        model: str,
        n: int,
        logprobs: int | None,
        fingerprint: str | None = None,
    ) -> None:
        self.rid, self.created, self.model = rid, created, model
        self.fingerprint = fingerprint
        self.logprobs = logprobs
        self.pending: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.offsets = [0] * n
        self._cache: dict[int, list[bytes]] = {}

    def delta(self, index: int, delta: Delta) -> TextCompletion | None:
        pending = self.pending[index]
        if self.logprobs is not None and delta.logprobs:
            pending.extend(delta.logprobs)
        reason = finish_reason(delta.finish_reason)
        if not (delta.text or reason):
            return None
        lps = None
        if pending:
            lps, self.offsets[index] = completion_logprobs(
                pending, self.offsets[index], bool(self.logprobs)
            )
            self.pending[index] = []
        return self._completion([TextChoice(index, delta.text, lps, reason)])

    def usage(self, usage: UsageBody) -> TextCompletion:
        return self._completion([], usage)

    def _completion(self, choices: list[TextChoice], usage: UsageBody | None = None):
        return TextCompletion(
            id=self.rid,
            created=self.created,
            model=self.model,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=usage,
        )

    def event(self, index: int, delta: Delta) -> bytes:
        """``sse(self.delta(index, delta))``, or b"" when there is nothing to send yet."""
        plain = not (self.pending[index] or (self.logprobs is not None and delta.logprobs))
        if plain and delta.text and delta.finish_reason is None:
            return ENCODER.encode(delta.text).join(self._template(index))
        chunk = self.delta(index, delta)
        return b"" if chunk is None else sse(chunk)

    def _template(self, index: int) -> list[bytes]:
        found = self._cache.get(index)
        if found is None:
            choice = TextChoice(index, _MARK)
            found = self._cache[index] = _template(self._completion([choice]))
        return found
