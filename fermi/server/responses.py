"""``POST /v1/responses``: engine deltas -> the Responses API's output items, streamed as
its server-sent events or returned as one response object.

:class:`ResponseWriter` holds one response's output items (reasoning, messages, function
calls, in the order the model wrote them) and, when streaming, writes the events that
open, fill and close each: ``response.output_item.added``, ``response.content_part.added``,
the deltas, then ``....done`` in reverse, and ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut the reply) with the whole response.
The same writer builds the non-streamed response, so both read the same.

A streamed token is usually text alone, in an item already open. Its delta event is then
spliced into a template built when the item opened (the event encoded once, split where a
marker text and a marker sequence number stand), as the chat chunks are (``chunks.py``):
joining five byte strings instead of building and encoding a Struct per token.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec

from fermi.engine.types import Delta, GenerationRequest, TokenLogprob
from fermi.heap import off_loop
from fermi.server.build import decode_body
from fermi.server.chunks import ChoiceText, chat_logprobs
from fermi.server.errors import ApiError
from fermi.server.generation import Generation
from fermi.server.handlers import (
    Api,
    Reply,
    StreamReply,
    _raise_engine_error,
    _Timing,
)
from fermi.server.protocol import ENCODER, ChatTokenLogprob
from fermi.server.responses_build import response_request
from fermi.server.responses_protocol import (
    RESPONSES_DECODER,
    ContentPartAdded,
    ContentPartDone,
    Event,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    FunctionCallItem,
    IncompleteDetails,
    InputTokens,
    InputTokensDetails,
    MessageItem,
    OutputItem,
    OutputItemAdded,
    OutputItemDone,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    OutputTokensDetails,
    ReasoningEcho,
    ReasoningItem,
    ReasoningText,
    ReasoningTextDelta,
    ReasoningTextDone,
    ResponseBody,
    ResponseCompleted,
    ResponseCreated,
    ResponseErrorBody,
    ResponseFailed,
    ResponseIncomplete,
    ResponseInProgress,
    ResponsesRequest,
    ResponseUsage,
    TextEcho,
)
from fermi.text.tools import ToolCallDelta

MESSAGE, REASONING, FUNCTION_CALL = "message", "reasoning", "function_call"
ID_PREFIX = {MESSAGE: "msg", REASONING: "rs", FUNCTION_CALL: "fc"}
_MARK = "\x00fermi-delta\x00"
_MARK_JSON = ENCODER.encode(_MARK)
_SEQ_MARK = 987654321987654321  # a sequence number no stream reaches
_SEQ_JSON = b"%d" % _SEQ_MARK
_PREFIXES: dict[type, bytes] = {}


def event_bytes(event: Event) -> bytes:
    """One server-sent event: ``event: <type>`` and the JSON body as ``data:``."""
    cls = type(event)
    prefix = _PREFIXES.get(cls)
    if prefix is None:
        tag = cls.__struct_config__.tag
        prefix = _PREFIXES[cls] = b"event: " + tag.encode() + b"\ndata: "
    return prefix + ENCODER.encode(event) + b"\n\n"


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Item:
    """One output item as it is written: its kind, ids, position and text so far."""

    __slots__ = (
        "call_id",
        "id",
        "index",
        "kind",
        "logprobs",
        "name",
        "parts",
        "status",
        "template",
    )

    def __init__(self, kind: str, index: int, call_id: str = "", name: str = "") -> None:
        self.kind = kind
        self.id = _new_id(ID_PREFIX[kind])
        self.index = index
        self.call_id = call_id
        self.name = name
        self.parts: list[str] = []
        self.logprobs: list[ChatTokenLogprob] = []  # a message's, when they were asked for
        self.status = "in_progress"
        # (head, middle, tail) of this item's delta event: head + JSON text + middle +
        # sequence number + tail is the event.
        self.template: tuple[bytes, bytes, bytes] = (b"", b"", b"")

    def announced(self) -> OutputItem:
        """The item as ``response.output_item.added`` shows it: begun, with no content
        (the content part is added by an event of its own)."""
        if self.kind == MESSAGE:
            return MessageItem(id=self.id, status="in_progress", content=[])
        if self.kind == REASONING:
            return ReasoningItem(id=self.id, content=[], status="in_progress")
        return self.output()

    def output(self) -> OutputItem:
        text, status = "".join(self.parts), self.status
        if self.kind == MESSAGE:
            content = [OutputText(text, logprobs=self.logprobs)]
            return MessageItem(id=self.id, status=status, content=content)
        if self.kind == REASONING:
            return ReasoningItem(id=self.id, content=[ReasoningText(text)], status=status)
        return FunctionCallItem(
            id=self.id, call_id=self.call_id, name=self.name, arguments=text, status=status
        )


class ResponseWriter:
    """One response's output items, built delta by delta; with ``stream``, also its events
    (``opening``, ``event`` per delta, ``closing`` or ``failed``). ``head`` is the response
    object as created: its settings, ``in_progress``, no output yet."""

    def __init__(self, head: ResponseBody, stream: bool) -> None:
        self.head = head
        self.stream = stream
        self.items: list[_Item] = []
        self.open: _Item | None = None
        self.calls: dict[int, _Item] = {}  # a tool call's index -> its item
        self.seq = 0
        # Tokens generated before the answer (text or a call) began: the reasoning's.
        self.answered = False
        self.thinking_tokens = 0
        # Log-probabilities of tokens whose text has not come out yet; the next text of a
        # message takes them (those of reasoning and of calls are not returned).
        self.pending: list[TokenLogprob] = []
        self._events: list[bytes] = []

    # -- streaming --------------------------------------------------------------------

    def opening(self) -> bytes:
        self._emit(ResponseCreated(response=self.head))
        self._emit(ResponseInProgress(response=self.head))
        return self._take()

    def event(self, delta: Delta) -> bytes:
        """The events of one delta (b"" when it carries nothing to send yet). Text alone
        for an open message, or reasoning alone for open reasoning, is spliced into the
        item's template here (the per-token path, kept to a few operations)."""
        item = self.open
        plain = not (delta.tool_calls or delta.logprobs or self.pending)
        if item is not None and delta.finish_reason is None and plain:
            text, reasoning = delta.text, delta.reasoning
            piece = ""
            if item.kind == MESSAGE and not reasoning:
                piece = text
            elif item.kind == REASONING and reasoning and not text:
                piece = reasoning
                self.thinking_tokens += len(delta.token_ids)
            if piece:
                item.parts.append(piece)
                seq = self.seq
                self.seq = seq + 1
                head, middle, tail = item.template
                return b"".join((head, ENCODER.encode(piece), middle, b"%d" % seq, tail))
        self.add(delta)
        return self._take()

    def closing(self, choice: ChoiceText, prompt_tokens: int) -> bytes:
        self.finish(choice, prompt_tokens)
        return self._take()

    def failed(self, message: str, code: str = "server_error") -> bytes:
        """The stream's last event after the engine failed: ``response.failed``."""
        if self.open is not None:
            self.open.status = "incomplete"
        response = msgspec.structs.replace(
            self.head,
            status="failed",
            error=ResponseErrorBody(code, message),
            output=[item.output() for item in self.items],
        )
        self._emit(ResponseFailed(response=response))
        return self._take()

    # -- building ---------------------------------------------------------------------

    def add(self, delta: Delta) -> None:
        """Take one delta: its reasoning, then its text, then its tool-call pieces."""
        if not self.answered:
            if delta.text or delta.tool_calls:
                self.answered = True
            else:
                self.thinking_tokens += len(delta.token_ids)
        if delta.logprobs:
            self.pending.extend(delta.logprobs)
        if delta.reasoning:
            self._append(self._current(REASONING), delta.reasoning)
        if delta.text:
            self._append(self._current(MESSAGE), delta.text)
        for piece in delta.tool_calls or ():
            self._call(piece)

    def finish(self, choice: ChoiceText, prompt_tokens: int) -> ResponseBody:
        """Close the last item and return the whole response (streaming: also its
        ``response.completed`` or ``response.incomplete`` event)."""
        cut = choice.finish_reason == "length"
        if not self.items:  # the output is never empty: an empty answer is an empty message
            self._start(MESSAGE)
        if self.open is not None:
            self._close(self.open, "incomplete" if cut else "completed")
        reasoned = any(item.kind == REASONING for item in self.items)
        reasoning_tokens = min(self.thinking_tokens, choice.tokens) if reasoned else 0
        usage = ResponseUsage(
            input_tokens=prompt_tokens,
            input_tokens_details=InputTokensDetails(choice.cached),
            output_tokens=choice.tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens),
            total_tokens=prompt_tokens + choice.tokens,
        )
        response = msgspec.structs.replace(
            self.head,
            status="incomplete" if cut else "completed",
            completed_at=None if cut else int(time.time()),
            incomplete_details=IncompleteDetails("max_output_tokens") if cut else None,
            output=[item.output() for item in self.items],
            usage=usage,
        )
        if cut:
            self._emit(ResponseIncomplete(response=response))
        else:
            self._emit(ResponseCompleted(response=response))
        return response

    def _call(self, piece: ToolCallDelta) -> None:
        if piece.id is not None:  # a call starts: its own item
            item = self._start(FUNCTION_CALL, call_id=piece.id, name=piece.name or "")
            self.calls[piece.index] = item
        else:
            item = self.calls[piece.index]
        if piece.arguments:
            self._append(item, piece.arguments)

    def _current(self, kind: str) -> _Item:
        """The open item if it is of ``kind``, else a new one (the open one closed)."""
        item = self.open
        return item if item is not None and item.kind == kind else self._start(kind)

    def _append(self, item: _Item, text: str) -> None:
        item.parts.append(text)
        if self.pending:
            if item.kind == MESSAGE:
                self._append_logprobs(item, text)
                return
            self.pending = []
        if self.stream:
            self._events.append(self._delta(item, text))

    def _append_logprobs(self, item: _Item, text: str) -> None:
        logprobs = chat_logprobs(self.pending).content
        self.pending = []
        item.logprobs += logprobs
        if self.stream:
            at = {"item_id": item.id, "output_index": item.index, "content_index": 0}
            self._emit(OutputTextDelta(**at, delta=text, logprobs=logprobs))

    def _start(self, kind: str, call_id: str = "", name: str = "") -> _Item:
        if self.open is not None:
            self._close(self.open, "completed")
        item = _Item(kind, len(self.items), call_id, name)
        self.items.append(item)
        self.open = item
        if not self.stream:
            return item
        at = {"item_id": item.id, "output_index": item.index}
        self._emit(OutputItemAdded(output_index=item.index, item=item.announced()))
        if kind == MESSAGE:
            part = ContentPartAdded(**at, content_index=0, part=OutputText(""))
            self._emit(part)
            marked = OutputTextDelta(sequence_number=_SEQ_MARK, **at, content_index=0, delta=_MARK)
        elif kind == REASONING:
            part = ContentPartAdded(**at, content_index=0, part=ReasoningText(""))
            self._emit(part)
            marked = ReasoningTextDelta(
                sequence_number=_SEQ_MARK, **at, content_index=0, delta=_MARK
            )
        else:
            marked = FunctionCallArgumentsDelta(sequence_number=_SEQ_MARK, **at, delta=_MARK)
        head, rest = event_bytes(marked).split(_MARK_JSON)
        middle, tail = rest.split(_SEQ_JSON)
        item.template = (head, middle, tail)
        return item

    def _close(self, item: _Item, status: str) -> None:
        item.status = status
        self.open = None
        if not self.stream:
            return
        text = "".join(item.parts)
        at = {"item_id": item.id, "output_index": item.index}
        if item.kind == MESSAGE:
            lps = item.logprobs
            self._emit(OutputTextDone(**at, content_index=0, text=text, logprobs=lps))
            part = OutputText(text, logprobs=lps)
            self._emit(ContentPartDone(**at, content_index=0, part=part))
        elif item.kind == REASONING:
            self._emit(ReasoningTextDone(**at, content_index=0, text=text))
            part = ReasoningText(text)
            self._emit(ContentPartDone(**at, content_index=0, part=part))
        else:
            self._emit(FunctionCallArgumentsDone(**at, name=item.name, arguments=text))
        done = OutputItemDone(output_index=item.index, item=item.output())
        self._emit(done)

    def _delta(self, item: _Item, text: str) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        head, middle, tail = item.template
        return b"".join((head, ENCODER.encode(text), middle, b"%d" % seq, tail))

    def _emit(self, event: Event) -> None:
        event.sequence_number = self.seq
        self.seq += 1
        self._events.append(event_bytes(event))

    def _take(self) -> bytes:
        events, self._events = self._events, []
        return b"".join(events)


def response_head(body: ResponsesRequest, request: GenerationRequest, model: str) -> ResponseBody:
    """The response object as created: what was asked, sampling as resolved."""
    reasoning = body.reasoning
    text = body.text.format if body.text is not None and body.text.format else {"type": "text"}
    return ResponseBody(
        id=_new_id("resp"),
        created_at=int(time.time()),
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        max_tool_calls=body.max_tool_calls,
        model=model,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        reasoning=ReasoningEcho(
            reasoning.effort if reasoning else None,
            (reasoning.summary or reasoning.generate_summary) if reasoning else None,
        ),
        temperature=request.params.temperature,
        text=TextEcho(text),
        tool_choice=body.tool_choice if body.tool_choice is not None else "auto",
        tools=body.tools or [],
        top_logprobs=body.top_logprobs or 0,
        top_p=request.params.top_p,
        truncation=body.truncation or "disabled",
        user=body.user,
        metadata=body.metadata or {},
    )


class ResponsesStreamReply(StreamReply):
    """A streamed response: the events of :class:`ResponseWriter`, delivered as the chat
    streams are (pulled, or pushed from the engine thread)."""

    def __init__(
        self,
        api: Api,
        generation: Generation,
        timing: _Timing,
        writer: ResponseWriter,
        requests: list[GenerationRequest],
    ) -> None:
        super().__init__(api, generation, timing, None, requests, 1, False)  # type: ignore[arg-type]
        self.writer = writer

    def opening(self) -> bytes:
        return self.writer.opening()

    def feed(self, index: int, delta: Delta) -> bytes:
        if delta.error:  # counted and ended as every stream's, through failed_event
            return super().feed(index, delta)
        self.choices[index].end(delta)
        return self.writer.event(delta)

    def closing(self) -> bytes:
        prompt_tokens = self.timing.done(self.requests, 1, self.choices)
        return self.writer.closing(self.choices[0], prompt_tokens)

    def failed_event(self, error: ApiError) -> bytes:
        """A failure after the stream started (the engine's, or the server adapter's
        catch-all) ends it with ``response.failed``. The API's error codes have none for
        a request's own fault such as a grammar past its limits: that is
        ``invalid_prompt``, with our code leading the message."""
        if error.status < 500:
            message = f"{error.code}: {error.message}" if error.code else error.message
            return self.writer.failed(message, "invalid_prompt")
        return self.writer.failed(error.message)


async def count_input_tokens(api: Api, raw: bytes) -> Reply:
    """Answer ``POST /v1/responses/input_tokens``: the prompt tokens a ``create`` with this
    body would have, as rendered (instructions, tools and all)."""
    body: ResponsesRequest = decode_body(RESPONSES_DECODER, raw)
    api._check_model(body.model)
    request = await off_loop(response_request, api.pool.engine, body)
    return Reply(200, ENCODER.encode(InputTokens(len(request.prompt_ids))))


async def create_response(api: Api, raw: bytes) -> Reply | StreamReply:
    """Answer ``POST /v1/responses``: a stream of events, or the whole response object."""
    start = time.perf_counter()
    body: ResponsesRequest = decode_body(RESPONSES_DECODER, raw)
    api._check_model(body.model)
    # Templating and tokenising in a worker thread, as for chat (handlers.Api._generate).
    request = await off_loop(response_request, api.pool.engine, body)
    requests = [request]
    generation = Generation(api.pool, requests, asyncio.get_running_loop())
    timing = _Timing(api.metrics, start)
    writer = ResponseWriter(response_head(body, request, api.model_name), body.stream)
    if body.stream:
        return ResponsesStreamReply(api, generation, timing, writer, requests)
    choice = ChoiceText()
    try:
        async for batch in generation.batches():
            timing.arrived()
            for _, delta in batch:
                _raise_engine_error(delta)
                writer.add(delta)
                choice.end(delta)
    finally:
        api._release(generation, timing)
    response = writer.finish(choice, timing.done(requests, 1, [choice]))
    return Reply(200, ENCODER.encode(response))
