"""Token ids -> text deltas for one sequence: detokenize, stop strings, reasoning split,
and the text of its log-probabilities.

Order matters: stop strings are matched on the model's raw text (so a stop string is
found wherever it appears), the reasoning split runs on what survives, and tool calls are
parsed from the answer the split leaves.
"""

from __future__ import annotations

from fermi.engine.types import Delta, FinishReason, GenerationRequest, TokenLogprob
from fermi.text.detokenize import IncrementalDetokenizer
from fermi.text.reasoning import ReasoningSplitter
from fermi.text.stops import StopStringMatcher
from fermi.text.token_bytes import token_text
from fermi.text.tokenizer import Tokenizer
from fermi.text.tools import ToolCallDelta, ToolCallParser


class OutputStream:
    def __init__(self, tokenizer: Tokenizer, request: GenerationRequest) -> None:
        self.request = request
        self.detok = IncrementalDetokenizer(tokenizer, request.skip_special_tokens)
        self.stops = StopStringMatcher(request.stop_strings or request.stop)
        self.splitter = (
            ReasoningSplitter(request.start_in_reasoning, answer_tags=request.answer_tags)
            if request.split_reasoning
            else None
        )
        self.tools = (
            ToolCallParser(request.tool_format, None if request.parallel_tool_calls else 1)
            if request.tool_format
            else None
        )
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []

    def logprob(
        self, token_id: int, logprob: float, top: list[tuple[int, float]]
    ) -> TokenLogprob | None:
        """The chosen token's log-probability and up to ``request.logprobs`` alternatives,
        with their bytes and text; None when the request asked for none."""
        k = self.request.logprobs
        if k is None:
            return None
        alternatives = tuple(self._token(t, p) for t, p in top[:k])
        return self._token(token_id, logprob, alternatives)

    def _token(
        self, token_id: int, logprob: float, top: tuple[TokenLogprob, ...] = ()
    ) -> TokenLogprob:
        raw = self.tokenizer.token_bytes(token_id)
        return TokenLogprob(token_id, token_text(raw), raw, logprob, top)

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self.splitter is None:
            return "", text
        reasoning, content = self.splitter.feed(text) if text else ("", "")
        if final:
            r, c = self.splitter.flush()
            reasoning, content = reasoning + r, content + c
        return reasoning, content

    def _calls(self, content: str, final: bool) -> tuple[str, list[ToolCallDelta] | None]:
        """The answer's text without its tool calls, and the calls' pieces."""
        if self.tools is None:
            return content, None
        text, calls = self.tools.feed(content) if content else ("", [])
        if final:
            tail, more = self.tools.finish()
            text, calls = text + tail, calls + more
        return text, calls or None

    def _ending(self, reason: FinishReason) -> FinishReason:
        """``reason``, or tool_calls when a reply that called tools ended as it should."""
        if reason == "stop" and self.tools is not None and self.tools.calls:
            return "tool_calls"
        return reason

    def push(
        self, token_id: int, logprob: TokenLogprob | None = None
    ) -> tuple[Delta, FinishReason | None]:
        """Add one generated token; return its delta and a finish reason if it ends the
        sequence (an eos token or a stop string: stop, or tool_calls after tool calls)."""
        req = self.request
        self.token_ids.append(token_id)
        delta = Delta(token_ids=[token_id], logprobs=[logprob] if logprob else None)
        if token_id in req.eos_token_ids and not req.ignore_eos:
            return delta, self._ending("stop")
        text, stopped = self.stops.feed(self.detok.add(token_id))
        delta.reasoning, content = self._split(text, final=False)
        delta.text, delta.tool_calls = self._calls(content, final=False)
        return delta, (self._ending("stop") if stopped else None)

    def finish(self, reason: FinishReason) -> Delta:
        """Release held-back text and tool-call pieces at the end of the sequence. The
        delta's finish_reason is ``reason``, or tool_calls when ``reason`` is stop (an eos
        token, a stop string, the grammar complete) and the reply called tools."""
        tail = ""
        if not self.stops.stopped:
            tail, stopped = self.stops.feed(self.detok.flush())
            if not stopped:
                tail += self.stops.flush()
        reasoning, content = self._split(tail, final=True)
        text, calls = self._calls(content, final=True)
        return Delta(
            text=text,
            reasoning=reasoning,
            finish_reason=self._ending(reason),
            tool_calls=calls,
            stop_string=self.stops.matched,
        )
