"""Engine deltas -> OpenAI bodies: streamed chunks and whole responses, per choice.

These classes hold the per-request state the mapping needs (role sent, logprobs not
yet attached, text gathered so far) and nothing else, so they are tested without a server.
"""

from __future__ import annotations

from fermi.engine.types import Delta, TokenLogprob
from fermi.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatTokenLogprob,
    ChunkDelta,
    CompletionLogprobs,
    TextChoice,
    TextCompletion,
    TopLogprob,
    UsageBody,
)

# JSON has no -inf; OpenAI reports impossible tokens with this floor.
LOGPROB_FLOOR = -9999.0


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows stop and length; a cancelled request ended early, which reads as stop."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def _lp(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        [
            ChatTokenLogprob(
                t.token,
                _lp(t.logprob),
                list(t.token.encode()),
                [TopLogprob(tok, _lp(p), list(tok.encode())) for _, tok, p in t.top],
            )
            for t in items
        ]
    )


def completion_logprobs(
    items: list[TokenLogprob], offset: int, with_top: bool
) -> CompletionLogprobs:
    """Legacy completions shape; ``offset`` is where the first token starts in the text."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    top = [{tok: _lp(p) for _, tok, p in t.top} for t in items] if with_top else None
    return CompletionLogprobs(
        [t.token for t in items], [_lp(t.logprob) for t in items], top, offsets
    )


def usage_body(prompt_tokens: int, completion_tokens: int) -> UsageBody:
    return UsageBody(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


class ChoiceText:
    """Everything one choice produced, for a non-streaming response."""

    __slots__ = ("finish_reason", "logprobs", "reasoning", "text", "tokens")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.tokens = 0

    def add(self, delta: Delta) -> None:
        if delta.text:
            self.text.append(delta.text)
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = finish_reason(delta.finish_reason)
            self.tokens = delta.usage.completion_tokens if delta.usage else 0


def chat_completion(
    rid: str,
    created: int,
    model: str,
    choices: list[ChoiceText],
    prompt_tokens: int,
    want_logprobs: bool,
) -> ChatCompletion:
    out = []
    for i, c in enumerate(choices):
        reasoning = "".join(c.reasoning) or None
        message = AssistantMessage("assistant", "".join(c.text), reasoning, reasoning)
        lps = chat_logprobs(c.logprobs) if want_logprobs else None
        out.append(ChatChoice(i, message, lps, c.finish_reason))
    usage = usage_body(prompt_tokens, sum(c.tokens for c in choices))
    return ChatCompletion(id=rid, created=created, model=model, choices=out, usage=usage)


def text_completion(
    rid: str,
    created: int,
    model: str,
    choices: list[ChoiceText],
    prompt_tokens: int,
    logprobs: int | None,
) -> TextCompletion:
    out = []
    for i, c in enumerate(choices):
        lps = completion_logprobs(c.logprobs, 0, bool(logprobs)) if logprobs is not None else None
        out.append(TextChoice(i, "".join(c.text), lps, c.finish_reason))
    usage = usage_body(prompt_tokens, sum(c.tokens for c in choices))
    return TextCompletion(id=rid, created=created, model=model, choices=out, usage=usage)


class ChatChunker:
    """Deltas of ``n`` choices -> ``chat.completion.chunk``s with one id and created."""

    def __init__(self, rid: str, created: int, model: str, n: int, want_logprobs: bool) -> None:
        self.rid, self.created, self.model = rid, created, model
        self.want_logprobs = want_logprobs
        # Logprobs of tokens whose text is still held back (stop strings, tags) ride along
        # with the next chunk that is sent, so none are lost and none are duplicated.
        self.pending: list[list[TokenLogprob]] = [[] for _ in range(n)]

    def _chunk(self, choices: list[ChatChunkChoice], usage: UsageBody | None = None):
        return ChatCompletionChunk(
            id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage
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
        if not (delta.text or delta.reasoning or reason):
            return None
        body = ChunkDelta(
            content=delta.text or None,
            reasoning_content=delta.reasoning or None,
            reasoning=delta.reasoning or None,
        )
        lps = None
        if pending:
            lps = chat_logprobs(pending)
            self.pending[index] = []
        return self._chunk([ChatChunkChoice(index, body, lps, reason)])

    def usage(self, usage: UsageBody) -> ChatCompletionChunk:
        return self._chunk([], usage)


class TextChunker:
    """Deltas of ``n`` choices -> streamed ``text_completion`` objects."""

    def __init__(self, rid: str, created: int, model: str, n: int, logprobs: int | None) -> None:
        self.rid, self.created, self.model = rid, created, model
        self.logprobs = logprobs
        self.pending: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.offsets = [0] * n

    def delta(self, index: int, delta: Delta) -> TextCompletion | None:
        pending = self.pending[index]
        if self.logprobs is not None and delta.logprobs:
            pending.extend(delta.logprobs)
        reason = finish_reason(delta.finish_reason)
        if not (delta.text or reason):
            return None
        lps = None
        if pending:
            lps = completion_logprobs(pending, self.offsets[index], bool(self.logprobs))
            self.offsets[index] += sum(len(t.token) for t in pending)
            self.pending[index] = []
        choice = TextChoice(index, delta.text, lps, reason)
        return TextCompletion(id=self.rid, created=self.created, model=self.model, choices=[choice])

    def usage(self, usage: UsageBody) -> TextCompletion:
        return TextCompletion(
            id=self.rid, created=self.created, model=self.model, choices=[], usage=usage
        )
