"""OpenAI's Responses API (``POST /v1/responses``) as msgspec Structs: the request body
decoded from bytes, the response object, its output items and the streamed events.

Shapes follow the ``openai`` package's ``types/responses`` (what its SDK parses). Request
Structs ignore unknown fields, like the chat ones; the fields Fermi cannot honour are
declared so that ``responses_build`` refuses them by name instead of ignoring them.
Output Structs are tagged by ``type``, which msgspec writes first, as OpenAI does.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from fermi.server.protocol import Seed

# -- the request ------------------------------------------------------------------------


class ResponsesContentPart(msgspec.Struct):
    """A part of a message's content: ``input_text`` / ``output_text`` (``text``),
    ``refusal`` (``refusal``); other types (images, files, audio) are refused."""

    type: str
    text: str | None = None
    refusal: str | None = None


class ResponsesInputItem(msgspec.Struct):
    """One item of ``input``. Which fields apply depends on ``type`` (a message may leave
    it out): ``message`` (role, content), ``function_call`` (call_id, name, arguments),
    ``function_call_output`` (call_id, output), ``reasoning`` (passed back, ignored).
    ``responses_build`` checks each type's fields and names the one that is wrong."""

    type: str | None = None
    role: str | None = None
    content: str | list[ResponsesContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    # A string, or a list of content parts (only text ones are taken).
    output: str | list[ResponsesContentPart] | None = None
    id: str | None = None
    status: str | None = None


class ResponsesReasoning(msgspec.Struct):
    effort: str | None = None  # none / minimal: thinking off; low and up: on; null: auto
    summary: str | None = None  # accepted; the whole reasoning is returned as content
    generate_summary: str | None = None  # the deprecated name of summary


class ResponsesText(msgspec.Struct):
    # {"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "name", "schema",
    # "strict", "description"}: checked by fermi.grammar, under the param text.format.
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    # The lists as raw JSON, decoded item by item in the worker thread, as chat
    # completions' are (``fermi.server.protocol.ChatCompletionRequest``).
    input: str | list[msgspec.Raw] | None = None  # each a ResponsesInputItem
    instructions: str | None = None
    # Function tools in the Responses API's flat shape; any other type is refused by name.
    tools: list[msgspec.Raw] | None = None  # each an object
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: ResponsesText | None = None
    reasoning: ResponsesReasoning | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None  # built-in tools only: none run here
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    stream: bool | None = False  # null: False (__post_init__)
    stream_options: dict[str, Any] | None = None
    store: bool | None = None  # accepted; nothing is kept (see the README)
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    # Need responses stored on the server (or hosted by OpenAI): refused when given.
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    context_management: Any = None
    # Fermi's extensions, as on chat completions (named as SamplingSettings' fields).
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = False
    logit_bias: dict[str, float] | None = None

    def __post_init__(self) -> None:
        # null is unset, as OpenAI's API takes it: the handlers read plain values.
        if self.stream is None:
            self.stream = False
        if self.ignore_eos is None:
            self.ignore_eos = False


RESPONSES_DECODER = msgspec.json.Decoder(ResponsesRequest)

# -- the response object ----------------------------------------------------------------


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningText(msgspec.Struct, tag_field="type", tag="reasoning_text"):
    text: str


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(msgspec.Struct, tag_field="type", tag="message", kw_only=True):
    id: str
    status: ItemStatus
    role: str = "assistant"
    content: list[OutputText]


class ReasoningItem(msgspec.Struct, tag_field="type", tag="reasoning", kw_only=True):
    """The model's thinking, whole, as ``reasoning_text`` content (as open-weight servers
    return it); no summary is written."""

    id: str
    summary: list[Any] = msgspec.field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call", kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str  # JSON text
    status: ItemStatus


OutputItem = MessageItem | ReasoningItem | FunctionCallItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens whose KV cache was reused, not prefilled
    # OpenAI's count of prompt tokens billed as cache writes (its SDK requires the field):
    # keeping a request's KV cache for reuse costs nothing extra here.
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(msgspec.Struct):
    reason: str  # max_output_tokens


class ResponseErrorBody(msgspec.Struct):
    code: str
    message: str


class ReasoningEcho(msgspec.Struct):
    effort: str | None = None
    summary: str | None = None


class TextEcho(msgspec.Struct):
    format: dict[str, Any]
    verbosity: str = "medium"


class ResponseBody(msgspec.Struct, kw_only=True):
    """The response object; its settings echo what the request asked for (sampling ones as
    resolved against the model's defaults), as the SDK's ``Response`` type expects."""

    id: str
    object: str = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    background: bool = False
    completed_at: int | None = None
    error: ResponseErrorBody | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    model: str
    output: list[OutputItem] = msgspec.field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: ReasoningEcho = msgspec.field(default_factory=ReasoningEcho)
    service_tier: str = "default"
    store: bool = False  # whatever was asked: nothing is kept
    temperature: float | None = None
    text: TextEcho
    tool_choice: str | dict[str, Any] = "auto"
    # The request's tools, echoed as they came (raw JSON items).
    tools: list[msgspec.Raw] = msgspec.field(default_factory=list)
    top_logprobs: int = 0
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class InputTokens(msgspec.Struct):
    """The answer of ``POST /v1/responses/input_tokens``."""

    input_tokens: int
    object: str = "response.input_tokens"


# -- streamed events ----------------------------------------------------------------------


class Event(msgspec.Struct, tag_field="type", kw_only=True):
    """A server-sent event; ``sequence_number`` counts the stream's events from 0 (the
    writer numbers each as it writes it)."""

    sequence_number: int = 0


class ResponseCreated(Event, tag="response.created"):
    response: ResponseBody


class ResponseInProgress(Event, tag="response.in_progress"):
    response: ResponseBody


class ResponseCompleted(Event, tag="response.completed"):
    response: ResponseBody


class ResponseIncomplete(Event, tag="response.incomplete"):
    response: ResponseBody


class ResponseFailed(Event, tag="response.failed"):
    response: ResponseBody


class OutputItemAdded(Event, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class OutputItemDone(Event, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class ContentPartAdded(Event, tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class ContentPartDone(Event, tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class OutputTextDelta(Event, tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class OutputTextDone(Event, tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningTextDelta(Event, tag="response.reasoning_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningTextDone(Event, tag="response.reasoning_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str


class FunctionCallArgumentsDelta(Event, tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDone(Event, tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    name: str
    arguments: str
