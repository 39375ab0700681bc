"""Anthropic's Messages API wire format as msgspec Structs, and its error shape.

Request Structs ignore unknown fields (``cache_control``, ``citations``, ``service_tier``
and the like are accepted and have no effect). A content block is one loose Struct whose
fields depend on its ``type``: ``anthropic.py`` checks them, so an unsupported or malformed
block is refused with a message naming it rather than msgspec's union error. Response
Structs are tagged: each encodes its ``type`` first, as Anthropic's do.
"""

from __future__ import annotations

from typing import Any

import msgspec

from fermi.engine.types import Thinking
from fermi.server.errors import ApiError
from fermi.server.protocol import Seed

# -- requests -------------------------------------------------------------------------


class AnthropicBlock(msgspec.Struct, kw_only=True):
    """A content block of any type; the fields it uses depend on ``type``."""

    type: str
    text: str | None = None  # text
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: Any = None  # tool_use: the call's arguments, an object
    tool_use_id: str | None = None  # tool_result
    content: str | list[AnthropicBlock] | None = None  # tool_result
    is_error: bool = False  # tool_result
    thinking: str | None = None  # thinking
    signature: str | None = None  # thinking


class AnthropicMessage(msgspec.Struct):
    role: str
    content: str | list[AnthropicBlock]


class AnthropicTool(msgspec.Struct, kw_only=True):
    """A client tool (``type`` absent or "custom"); server tools (``web_search_...``,
    ``bash_...``) have other types and are refused."""

    name: str | None = None
    type: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class AnthropicToolChoice(msgspec.Struct, kw_only=True):
    type: str  # auto, any, tool, none
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicThinking(msgspec.Struct, kw_only=True):
    type: str  # enabled, disabled, adaptive
    budget_tokens: int | None = None
    display: str | None = None


# ``output_config.effort``'s values; with adaptive thinking, whether the model thinks.
EFFORT_THINKING: dict[str, Thinking] = {
    "low": "off",
    "medium": "on",
    "high": "on",
    "xhigh": "on",
    "max": "on",
}
# Anthropic's API refuses a smaller thinking budget.
MIN_BUDGET_TOKENS = 1024


class AnthropicOutputFormat(msgspec.Struct, kw_only=True):
    type: str  # json_schema
    schema: dict[str, Any] | None = None


class AnthropicOutputConfig(msgspec.Struct, kw_only=True):
    format: AnthropicOutputFormat | None = None
    effort: str | None = None


# Anthropic's fields for features this server does not have: a 400 naming the field, not
# a reply that quietly went without them.
MESSAGES_UNSUPPORTED = {
    "mcp_servers": "MCP servers (mcp_servers) are not supported; send their tools as tools",
    "container": "code-execution containers (container) are not supported",
    "context_management": "context management (context_management) is not supported",
}


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/messages/count_tokens``: what renders the prompt."""

    model: str
    # Raw JSON, decoded item by item in the worker thread, as chat completions' lists are
    # (``fermi.server.protocol.ChatCompletionRequest``).
    messages: list[msgspec.Raw]  # each an AnthropicMessage
    system: str | list[AnthropicBlock] | None = None
    tools: list[msgspec.Raw] | None = None  # each an AnthropicTool
    tool_choice: AnthropicToolChoice | None = None
    thinking: AnthropicThinking | None = None
    output_config: AnthropicOutputConfig | None = None
    # The structured-outputs beta's name for output_config.format (older SDKs send it).
    output_format: AnthropicOutputFormat | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    """``POST /v1/messages``. The sampling settings are named as ``SamplingSettings``'
    fields, which take them by name."""

    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = False  # null: False (__post_init__)
    metadata: dict[str, Any] | None = None
    # Fermi's extensions, as on chat completions: a seed, and vLLM's ignore_eos.
    seed: Seed | None = None
    ignore_eos: bool | None = False
    # Anthropic features this server does not have: refused when given
    # (MESSAGES_UNSUPPORTED).
    mcp_servers: Any = None
    container: Any = None
    context_management: Any = None

    def __post_init__(self) -> None:
        # null is unset (clients that send every field send it): the handlers read plain values.
        if self.stream is None:
            self.stream = False
        if self.ignore_eos is None:
            self.ignore_eos = False


# -- responses ------------------------------------------------------------------------


class TextBlock(msgspec.Struct, tag="text"):
    text: str


class ThinkingBlock(msgspec.Struct, tag="thinking"):
    thinking: str
    signature: str


class ToolUseBlock(msgspec.Struct, tag="tool_use"):
    id: str
    name: str
    input: Any  # the parsed arguments, an object


ContentBlock = TextBlock | ThinkingBlock | ToolUseBlock


class Usage(msgspec.Struct, kw_only=True):
    # Anthropic's input_tokens leave out the prompt tokens read from a cache.
    input_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int


class Message(msgspec.Struct, kw_only=True, tag="message"):
    id: str
    role: str = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage


class TokenCount(msgspec.Struct):
    input_tokens: int


# -- stream events --------------------------------------------------------------------


class TextDelta(msgspec.Struct, tag="text_delta"):
    text: str


class ThinkingDelta(msgspec.Struct, tag="thinking_delta"):
    thinking: str


class SignatureDelta(msgspec.Struct, tag="signature_delta"):
    signature: str


class InputJsonDelta(msgspec.Struct, tag="input_json_delta"):
    partial_json: str


class MessageStart(msgspec.Struct, tag="message_start"):
    message: Message


class ContentBlockStart(msgspec.Struct, tag="content_block_start"):
    index: int
    content_block: ContentBlock


class ContentBlockDelta(msgspec.Struct, tag="content_block_delta"):
    index: int
    delta: TextDelta | ThinkingDelta | SignatureDelta | InputJsonDelta


class ContentBlockStop(msgspec.Struct, tag="content_block_stop"):
    index: int


class StopInfo(msgspec.Struct):
    stop_reason: str | None
    stop_sequence: str | None


class MessageDelta(msgspec.Struct, tag="message_delta"):
    delta: StopInfo
    usage: Usage


class MessageStop(msgspec.Struct, tag="message_stop"):
    pass


class ErrorObject(msgspec.Struct):
    type: str
    message: str


class ErrorResponse(msgspec.Struct, tag="error"):
    error: ErrorObject


ENCODER = msgspec.json.Encoder()
MESSAGES_DECODER = msgspec.json.Decoder(MessagesRequest)
COUNT_TOKENS_DECODER = msgspec.json.Decoder(CountTokensRequest)
MESSAGE_DECODER = msgspec.json.Decoder(AnthropicMessage)  # one item of messages
TOOL_DECODER = msgspec.json.Decoder(AnthropicTool)  # one item of tools


def sse(event: msgspec.Struct) -> bytes:
    """One server-sent event named as Anthropic names it: its body's ``type``."""
    name = type(event).__struct_config__.tag
    return b"event: " + name.encode() + b"\ndata: " + ENCODER.encode(event) + b"\n\n"


# -- errors ---------------------------------------------------------------------------

# Anthropic's error types by status; other 4xx are invalid requests, other 5xx api errors.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# Anthropic says a full engine with 529 overloaded_error (its clients retry it and say
# so); the OpenAI endpoints say 429.
OVERLOADED = 529


def speaks_anthropic(path: str) -> bool:
    """Whether errors on ``path`` take Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_status(error: ApiError) -> int:
    return OVERLOADED if error.code == "engine_overloaded" else error.status


def error_event(error: ApiError) -> ErrorResponse:
    """``{"type": "error", "error": {"type", "message"}}``. Anthropic's shape has no field
    for the parameter, so the message names it (as Anthropic's own messages do)."""
    status = error_status(error)
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    message = error.message
    if error.param and error.param not in message:
        message = f"{error.param}: {message}"
    return ErrorResponse(ErrorObject(kind, message))


def error_body(error: ApiError) -> bytes:
    return ENCODER.encode(error_event(error))
