"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A Messages request becomes the engine request a chat completion would: its messages in
the shape chat templates take (``tool_use`` blocks as an assistant's ``tool_calls``,
``tool_result`` blocks as ``tool`` turns, ``thinking`` blocks as ``reasoning_content``),
its tools and tool_choice in OpenAI's shape, checked by :mod:`fermi.text.tools` (whose
errors are renamed to this API's fields), ``thinking`` as the engine's switch. The reply's
reasoning, text and tool calls come back as ``thinking``, ``text`` and ``tool_use`` blocks.

Choices where Anthropic's API and a local model part ways:
- ``thinking`` absent means off, as on Anthropic's API; ``adaptive`` leaves the template's
  default, unless ``output_config.effort`` is given: ``low`` then turns thinking off, the
  other efforts on. Effort changes nothing else (a local model's answer is as long as it
  writes it). ``budget_tokens`` (at least 1024, as Anthropic's API asks) is not enforced:
  thinking ends when the model closes it, and counts toward ``max_tokens``.
- ``max_tokens`` beyond what the context leaves is clamped; a reply that fills the context
  ends with ``model_context_window_exceeded`` (Anthropic's stop reason for that).
- A ``tool_result`` with ``is_error`` reaches the template as "Error: " + its content; a
  thinking block's signature is an opaque string of ours, ignored when sent back.
- Refused with a 400 naming the block or field: images, documents and other non-text
  blocks, server tools, a final assistant message (prefill), ``thinking`` enabled with a
  ``tool_choice`` that forces a call (as Anthropic's API refuses it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from fermi.engine.requests import SamplingSettings
from fermi.engine.types import Delta, GenerationRequest, Thinking
from fermi.errors import RequestError
from fermi.grammar import Grammar
from fermi.heap import off_loop
from fermi.server.anthropic_protocol import (
    COUNT_TOKENS_DECODER,
    EFFORT_THINKING,
    ENCODER,
    MESSAGE_DECODER,
    MESSAGES_DECODER,
    MESSAGES_UNSUPPORTED,
    MIN_BUDGET_TOKENS,
    TOOL_DECODER,
    AnthropicBlock,
    ContentBlock,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    CountTokensRequest,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessagesRequest,
    MessageStart,
    MessageStop,
    SignatureDelta,
    StopInfo,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    TokenCount,
    ToolUseBlock,
    Usage,
    error_event,
    sse,
)
from fermi.server.build import check_counts, decode_body, decode_items
from fermi.server.chunks import ChoiceText
from fermi.server.errors import ApiError
from fermi.server.generation import Generation
from fermi.server.handlers import Reply, StreamReply, _Timing

if TYPE_CHECKING:
    from fermi.engine.api import Engine
    from fermi.server.handlers import Api

# Text blocks of one turn are paragraphs: joined by a blank line.
_JOIN = "\n\n"
_MARK = "\x00fermi-anthropic\x00"
_MARK_JSON = ENCODER.encode(_MARK)


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param)


# -- requests ---------------------------------------------------------------------------


_KINDS = {str: "a string", int: "an integer", dict: "an object"}


def _need(value: Any, kind: type, param: str, owner: str) -> Any:
    """``value`` if it is a ``kind``; else a 400 saying that ``owner`` needs the field."""
    if not isinstance(value, kind):
        field = param.rsplit(".", 1)[-1]
        raise _bad(f"{owner} needs {field}, {_KINDS[kind]}", param)
    return value


def _refuse(block: AnthropicBlock, param: str, where: str) -> ApiError:
    return _bad(
        f"content blocks of type {block.type!r} are not supported {where}; "
        "this server takes text, tool_use, tool_result and thinking blocks",
        f"{param}.type",
    )


def _text_of(block: AnthropicBlock, param: str) -> str:
    """A text block's text, which must hold more than whitespace (as Anthropic's API asks)."""
    text = _need(block.text, str, f"{param}.text", "a text block")
    if not text.strip():
        raise _bad("a text block must hold more than whitespace", f"{param}.text")
    return text


def _texts(content: str | list[AnthropicBlock] | None, param: str, where: str) -> str:
    """The text of a string or of a list of text blocks (system, a tool result)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, block in enumerate(content):
        at = f"{param}[{j}]"
        if block.type != "text":
            raise _refuse(block, at, where)
        texts.append(_text_of(block, at))
    return _JOIN.join(texts)


def _user_turn(blocks: list[AnthropicBlock], param: str, calls: set[str]) -> list[dict[str, Any]]:
    """A user turn: its tool results as ``tool`` turns (Anthropic puts them first), then
    its text, if any. ``calls``: the ids of the tool_use blocks before it."""
    if not blocks:
        raise _bad("a message's content must not be empty", param)
    turns: list[dict[str, Any]] = []
    texts = []
    for j, block in enumerate(blocks):
        at = f"{param}[{j}]"
        if block.type == "text":
            texts.append(_text_of(block, at))
        elif block.type == "tool_result":
            call = _need(block.tool_use_id, str, f"{at}.tool_use_id", "a tool_result block")
            if call not in calls:
                raise _bad(
                    f"tool_use_id {call!r} answers no tool_use block of an earlier message",
                    f"{at}.tool_use_id",
                )
            result = _texts(block.content, f"{at}.content", "in a tool_result")
            if block.is_error:
                result = f"Error: {result}"
            turns.append({"role": "tool", "tool_call_id": call, "content": result})
        else:
            raise _refuse(block, at, "in a user message")
    if texts or not turns:
        turns.append({"role": "user", "content": _JOIN.join(texts)})
    return turns


def _assistant_turn(blocks: list[AnthropicBlock], param: str) -> dict[str, Any]:
    texts, calls, reasoning = [], [], []
    for j, block in enumerate(blocks):
        at = f"{param}[{j}]"
        if block.type == "text":
            texts.append(_text_of(block, at))
        elif block.type == "tool_use":
            call_id = _need(block.id, str, f"{at}.id", "a tool_use block")
            name = _need(block.name, str, f"{at}.name", "a tool_use block")
            arguments = _need(block.input, dict, f"{at}.input", "a tool_use block")
            # The object itself: templates write a call's arguments with tojson.
            function = {"name": name, "arguments": arguments}
            calls.append({"id": call_id, "type": "function", "function": function})
        elif block.type == "thinking":
            reasoning.append(block.thinking or "")
        elif block.type != "redacted_thinking":  # (nothing a template could show)
            raise _refuse(block, at, "in an assistant message")
    turn: dict[str, Any] = {"role": "assistant", "content": _JOIN.join(texts)}
    if calls:
        turn["tool_calls"] = calls
    if reasoning:  # templates that keep the current turn's reasoning render it
        turn["reasoning_content"] = "".join(reasoning)
    return turn


def chat_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The system prompt and the messages as chat templates take them."""
    out: list[dict[str, Any]] = []
    calls: set[str] = set()  # the tool_use ids so far, which a tool_result must answer
    system = _texts(body.system, "system", "in system")
    if system:
        out.append({"role": "system", "content": system})
    messages = decode_items(body.messages, MESSAGE_DECODER, "messages")
    if not messages:  # (a system prompt alone is no conversation, on Anthropic's API too)
        raise _bad("messages must hold at least one message", "messages")
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if message.role not in ("user", "assistant"):
            raise _bad(f"role must be user or assistant, not {message.role!r}", f"{param}.role")
        if isinstance(message.content, str):
            if not message.content.strip():
                raise _bad("a message's content must hold more than whitespace", f"{param}.content")
            out.append({"role": message.role, "content": message.content})
        elif message.role == "user":
            out += _user_turn(message.content, f"{param}.content", calls)
        else:
            turn = _assistant_turn(message.content, f"{param}.content")
            if not (turn["content"].strip() or turn.get("tool_calls")):
                # ([], or thinking alone: nothing a template renders as the turn; a
                # whitespace string is refused above, as Anthropic's API refuses both)
                raise _bad(
                    "an assistant message's content must hold text or tool_use blocks",
                    f"{param}.content",
                )
            calls.update(call["id"] for call in turn.get("tool_calls", ()))
            out.append(turn)
    if messages and messages[-1].role == "assistant":
        raise _bad(
            "the last message must be the user's: continuing an assistant message "
            "(prefill) is not supported",
            f"messages[{len(messages) - 1}].role",
        )
    return out


def _tools(body: CountTokensRequest) -> list[dict[str, Any]] | None:
    """Client tools in OpenAI's shape (which ``fermi.text.tools`` checks)."""
    if body.tools is None:
        return None
    out = []
    for i, tool in enumerate(decode_items(body.tools, TOOL_DECODER, "tools")):
        if tool.type not in (None, "custom"):
            raise _bad(
                f"tools of type {tool.type!r} (server tools) are not supported; "
                "give client tools: name, description, input_schema",
                f"tools[{i}].type",
            )
        if tool.input_schema is None:
            raise _bad("a tool needs an input_schema", f"tools[{i}].input_schema")
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(body: CountTokensRequest) -> tuple[str | dict | None, bool | None]:
    """(OpenAI's tool_choice, parallel_tool_calls)."""
    choice = body.tool_choice
    if choice is None:
        return None, None
    disable = choice.disable_parallel_tool_use
    parallel = None if disable is None else not disable
    if choice.type == "tool":
        name = _need(choice.name, str, "tool_choice.name", "tool_choice of type 'tool'")
        return {"type": "function", "function": {"name": name}}, parallel
    mode = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type)
    if mode is None:
        raise _bad(
            f"tool_choice type must be auto, any, tool or none, not {choice.type!r}",
            "tool_choice.type",
        )
    return mode, parallel


def _effort(body: CountTokensRequest) -> Thinking | None:
    """``output_config.effort``, checked: what it makes of adaptive thinking (None: absent)."""
    config = body.output_config
    if config is None or config.effort is None:
        return None
    thinking = EFFORT_THINKING.get(config.effort)
    if thinking is None:
        raise _bad(
            f"output_config.effort must be one of {', '.join(EFFORT_THINKING)}, "
            f"not {config.effort!r}",
            "output_config.effort",
        )
    return thinking


def _thinking(body: CountTokensRequest, forced: bool) -> Thinking:
    given = body.thinking
    effort = _effort(body)
    if given is None or given.type == "disabled":
        return "off"
    if given.type == "adaptive":
        return effort or "auto"
    if given.type != "enabled":
        raise _bad(
            f"thinking type must be enabled, disabled or adaptive, not {given.type!r}",
            "thinking.type",
        )
    budget = _need(given.budget_tokens, int, "thinking.budget_tokens", "thinking of type 'enabled'")
    if budget < MIN_BUDGET_TOKENS:
        raise _bad(
            f"thinking.budget_tokens must be at least {MIN_BUDGET_TOKENS}, not {budget}",
            "thinking.budget_tokens",
        )
    if forced:
        raise _bad("thinking may not be enabled when tool_choice forces tool use", "thinking")
    return "on"


def _grammar(body: CountTokensRequest) -> Grammar | None:
    """``output_config.format`` (or the beta's ``output_format``): the reply follows a JSON
    schema."""
    config = body.output_config
    fmt, where = (config.format if config else None), "output_config.format"
    if body.output_format is not None:
        if fmt is not None:
            raise _bad(
                "output_format is the structured-outputs beta's name for "
                "output_config.format: send one of them",
                "output_format",
            )
        fmt, where = body.output_format, "output_format"
    if fmt is None:
        return None
    if fmt.type != "json_schema":
        raise _bad(f"{where} type must be json_schema, not {fmt.type!r}", f"{where}.type")
    schema = _need(fmt.schema, dict, f"{where}.schema", "a json_schema format")
    return Grammar.json_schema(schema)


def _prompt(engine: Engine, body: CountTokensRequest) -> dict[str, Any]:
    """The keyword arguments of ``Engine.build_request`` that make the prompt."""
    check_counts(engine, body.messages, body.tools)
    choice, parallel = _tool_choice(body)
    forced = choice == "required" or isinstance(choice, dict)
    return {
        "messages": chat_messages(body),
        "thinking": _thinking(body, forced),
        "tools": _tools(body),
        "tool_choice": choice,
        "parallel_tool_calls": parallel if body.tools else None,  # (moot without tools)
        "grammar": _grammar(body),
    }


# The engine's names for fields this API names otherwise.
_RENAMED = {
    "stop": "stop_sequences",
    "grammar": "output_config.format.schema",
    "prompt": "messages",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
}


# The engine's words for things this API names otherwise, as they appear in its messages.
_WORDS = (
    ("tool_choice required", 'tool_choice {"type": "any"}'),
    ("tool_choice named", 'tool_choice {"type": "tool"}'),
    ("a required or named tool_choice", "a forced tool_choice (any or tool)"),
    ("response_format", "output_config.format"),
    ("parameters must describe an object", "input_schema must describe an object"),
)


def _request_error(exc: RequestError) -> ApiError:
    param = exc.param or ""
    param = _RENAMED.get(param, param)
    if param.startswith("tools["):  # tools[0].function.parameters -> tools[0].input_schema
        param = param.replace(".function.parameters", ".input_schema").replace(".function", "")
    message = exc.message
    for ours, theirs in _WORDS:
        message = message.replace(ours, theirs)
    return ApiError(400, message, param=param or None, code=exc.code)


def messages_request(engine: Engine, body: MessagesRequest) -> GenerationRequest:
    for field, message in MESSAGES_UNSUPPORTED.items():
        if getattr(body, field) is not None:
            raise _bad(message, field)
    if body.temperature is not None and not 0.0 <= body.temperature <= 1.0:
        # (Anthropic's range; the engine takes up to fermi.sampling.MAX_TEMPERATURE)
        raise _bad(f"temperature must be between 0 and 1, got {body.temperature}", "temperature")
    try:
        # max_tokens 0 (a cache warm-up) prefills the prompt and samples one token.
        limit = body.max_tokens or 1
        settings = SamplingSettings.taken_from(body, stop=body.stop_sequences, max_tokens=limit)
        return engine.build_request(**_prompt(engine, body), settings=settings)
    except RequestError as exc:
        raise _request_error(exc) from None


def count_tokens(engine: Engine, body: CountTokensRequest) -> int:
    """The prompt's tokens as ``/v1/messages`` renders it (system, messages, tools)."""
    prompt = _prompt(engine, body)
    try:
        rendered = engine.chat_prompt(prompt["messages"], prompt["thinking"], prompt["tools"])
    except RequestError as exc:
        raise _request_error(exc) from None
    return len(rendered.token_ids)


# -- replies ----------------------------------------------------------------------------


def stop_reason(choice: ChoiceText, max_tokens: int) -> str:
    """Anthropic's stop reason of a reply that ended as ``choice`` says."""
    if choice.finish_reason == "tool_calls":
        return "tool_use"
    if choice.finish_reason == "length":
        # max_tokens is clamped to the room the context leaves: fewer tokens means it filled.
        return "max_tokens" if choice.tokens >= max_tokens else "model_context_window_exceeded"
    return "end_turn" if choice.stop_string is None else "stop_sequence"


def usage(choice: ChoiceText, prompt_tokens: int) -> Usage:
    return Usage(
        input_tokens=prompt_tokens - choice.cached,
        cache_read_input_tokens=choice.cached,
        output_tokens=choice.tokens,
    )


def signature(rid: str) -> str:
    """The opaque signature of a thinking block (nothing checks it when it comes back)."""
    return f"fermi.{rid}"


def tool_input(arguments: str) -> Any:
    """A call's arguments as the object a ``tool_use`` block holds; ``{}`` when they are
    not one (a call cut short by max_tokens, whose stop reason says so)."""
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def message(rid: str, model: str, choice: ChoiceText, prompt_tokens: int, max_tokens: int):
    """The whole reply: thinking, text, then the tool calls."""
    content: list[ContentBlock] = []
    if reasoning := "".join(choice.reasoning):
        content.append(ThinkingBlock(reasoning, signature(rid)))
    if text := "".join(choice.text):
        content.append(TextBlock(text))
    content += [ToolUseBlock(c.id, c.name, tool_input(c.arguments)) for c in choice.calls]
    return Message(
        id=rid,
        model=model,
        content=content,
        stop_reason=stop_reason(choice, max_tokens),
        stop_sequence=choice.stop_string,
        usage=usage(choice, prompt_tokens),
    )


def _template(event: ContentBlockDelta) -> list[bytes]:
    """``sse(event)`` split where the marker text stands (see ``chunks.py``)."""
    parts = sse(event).split(_MARK_JSON)
    assert len(parts) == 2, "the template has no marker"
    return parts


class MessageChunker:
    """Deltas of one reply -> Anthropic's stream events.

    A block opens when the kind of output changes (reasoning, text, a new tool call) and
    closes when the next opens or the reply ends; a thinking block gets its signature just
    before it closes. A delta that only continues the open block (nearly every token) is
    spliced into that block's pre-encoded ``content_block_delta`` event, as the chat
    chunker does."""

    def __init__(self, rid: str, model: str, prompt_tokens: int) -> None:
        self.rid, self.model, self.prompt_tokens = rid, model, prompt_tokens
        self.index = -1
        self.kind: str | None = None  # the open block's type
        self.parts: list[bytes] = []  # the open block's delta event, split at the marker

    def opening(self) -> bytes:
        # The whole prompt: which of its tokens a kept cache held is known at the end, when
        # message_delta's usage says it (its counts replace these).
        start = Message(
            id=self.rid,
            model=self.model,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=Usage(input_tokens=self.prompt_tokens, output_tokens=0),
        )
        return sse(MessageStart(start))

    def event(self, index: int, delta: Delta) -> bytes:
        """The events of one delta (``index`` is always 0: one reply per request)."""
        if delta.finish_reason is None:
            kind, text, reasoning, calls = self.kind, delta.text, delta.reasoning, delta.tool_calls
            if calls is None:
                if text and not reasoning:
                    if kind == "text":
                        return ENCODER.encode(text).join(self.parts)
                elif reasoning and not text:
                    if kind == "thinking":
                        return ENCODER.encode(reasoning).join(self.parts)
                elif not text:
                    return b""
            elif kind == "tool_use" and len(calls) == 1 and not (text or reasoning):
                call = calls[0]
                if call.id is None:  # arguments alone: the open call continues
                    return ENCODER.encode(call.arguments).join(self.parts)
        return b"".join(self._events(delta))

    def _events(self, delta: Delta) -> list[bytes]:
        out: list[bytes] = []
        if delta.reasoning:
            if self.kind != "thinking":
                self._open(out, ThinkingBlock("", ""), ThinkingDelta(_MARK))
            out.append(ENCODER.encode(delta.reasoning).join(self.parts))
        if delta.text:
            if self.kind != "text":
                self._open(out, TextBlock(""), TextDelta(_MARK))
            out.append(ENCODER.encode(delta.text).join(self.parts))
        for call in delta.tool_calls or ():
            if call.id is not None:
                self._open(out, ToolUseBlock(call.id, call.name, {}), InputJsonDelta(_MARK))
            if call.arguments:
                out.append(ENCODER.encode(call.arguments).join(self.parts))
        if delta.finish_reason is not None:
            self._close(out)
        return out

    def _open(self, out: list[bytes], block: ContentBlock, piece: Any) -> None:
        self._close(out)
        self.index += 1
        self.kind = type(block).__struct_config__.tag
        out.append(sse(ContentBlockStart(self.index, block)))
        self.parts = _template(ContentBlockDelta(self.index, piece))

    def _close(self, out: list[bytes]) -> None:
        if self.kind is None:
            return
        if self.kind == "thinking":
            out.append(sse(ContentBlockDelta(self.index, SignatureDelta(signature(self.rid)))))
        out.append(sse(ContentBlockStop(self.index)))
        self.kind = None

    def closing(self, choice: ChoiceText, prompt_tokens: int, max_tokens: int) -> bytes:
        stop = StopInfo(stop_reason(choice, max_tokens), choice.stop_string)
        return sse(MessageDelta(stop, usage(choice, prompt_tokens))) + sse(MessageStop())


class MessageStream(StreamReply):
    """A streamed Messages reply: Anthropic's events around the chunker's, delivered as
    every stream is (pulled or pushed, see ``StreamReply``)."""

    def __init__(
        self,
        api: Api,
        generation: Generation,
        timing: _Timing,
        chunker: MessageChunker,
        request: GenerationRequest,
        max_tokens: int,
    ) -> None:
        super().__init__(api, generation, timing, chunker, [request], 1, False)
        self.chunker: MessageChunker = chunker
        self.max_tokens = max_tokens

    def opening(self) -> bytes:
        return self.chunker.opening()

    def closing(self) -> bytes:
        prompt_tokens = self.timing.done(self.requests, 1, self.choices)
        return self.chunker.closing(self.choices[0], prompt_tokens, self.max_tokens)

    def failed_event(self, error: ApiError) -> bytes:
        return sse(error_event(error))


class Messages:
    """The two endpoints, on an :class:`Api`'s engines, metrics and model names."""

    def __init__(self, api: Api) -> None:
        self.api = api

    async def create(self, raw: bytes) -> Reply | StreamReply:
        api, start = self.api, time.perf_counter()
        body = decode_body(MESSAGES_DECODER, raw)
        api._check_model(body.model)
        # Templating and tokenising in a worker thread, as for chat completions.
        request = await off_loop(messages_request, api.pool.engine, body)
        generation = Generation(api.pool, [request], asyncio.get_running_loop())
        timing = _Timing(api.metrics, start)
        rid, model = f"msg_{uuid.uuid4().hex}", api.model_name
        if body.max_tokens == 0:
            return await self._warm_up(generation, timing, request, rid, body.stream)
        if body.stream:
            chunker = MessageChunker(rid, model, len(request.prompt_ids))
            return MessageStream(api, generation, timing, chunker, request, body.max_tokens)
        choices = await api._collect(generation, timing, 1)
        prompt_tokens = timing.done([request], 1, choices)
        reply = message(rid, model, choices[0], prompt_tokens, body.max_tokens)
        return Reply(200, ENCODER.encode(reply))

    async def _warm_up(
        self,
        generation: Generation,
        timing: _Timing,
        request: GenerationRequest,
        rid: str,
        stream: bool,
    ) -> Reply:
        """``max_tokens: 0``, Anthropic's way to fill the prompt cache without a reply: the
        prompt is prefilled (and kept for prefix reuse), the one token sampled is dropped,
        and the reply is an empty message ending with max_tokens."""
        choices = await self.api._collect(generation, timing, 1)
        prompt_tokens = timing.done([request], 1, choices)
        empty = ChoiceText()
        empty.finish_reason, empty.cached = "length", choices[0].cached
        model = self.api.model_name
        if not stream:
            return Reply(200, ENCODER.encode(message(rid, model, empty, prompt_tokens, 0)))
        chunker = MessageChunker(rid, model, prompt_tokens)
        events = chunker.opening() + chunker.closing(empty, prompt_tokens, 0)
        return Reply(200, events, "text/event-stream; charset=utf-8")

    async def count_tokens(self, raw: bytes) -> Reply:
        body = decode_body(COUNT_TOKENS_DECODER, raw)
        self.api._check_model(body.model)
        tokens = await off_loop(count_tokens, self.api.pool.engine, body)
        return Reply(200, ENCODER.encode(TokenCount(tokens)))
