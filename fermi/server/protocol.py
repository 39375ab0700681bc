"""OpenAI wire format as msgspec Structs: request bodies decoded from bytes, responses encoded.

Request Structs ignore unknown fields (OpenAI clients send many); response Structs list
their fields in OpenAI's order and keep ``null``s where OpenAI sends them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

# -- requests -------------------------------------------------------------------------

# A seed is a signed 64-bit integer, as on OpenAI's API: a larger one would wrap onto another
# seed's draws (the sampler keeps 64 bits), so it is refused at decoding, naming the field.
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant turn's refusal part, sent back


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text


class ToolCallBody(msgspec.Struct, kw_only=True):
    """A tool call, in an assistant message sent back (and in a reply)."""

    id: str
    type: str = "function"
    function: FunctionCall


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields both generation endpoints share. The sampling settings are named as
    ``SamplingSettings``' fields, which take them by name (``server/build.py``)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    # OpenAI's API takes null for n and stream as unset, and clients that send every field
    # send it: __post_init__ gives the default, so the handlers read plain values.
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension: keep generating past end-of-sequence (load tests want fixed lengths).
    ignore_eos: bool | None = False
    logit_bias: dict[str, float] | None = None  # token id (as a JSON key) -> [-100, 100]
    # vLLM's extensions this server does not have (build.SAMPLING_UNSUPPORTED): refused.
    min_tokens: Any = None
    stop_token_ids: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: bool | None = None  # only true, the default, is served
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    prompt_logprobs: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    truncate_prompt_tokens: Any = None

    def __post_init__(self) -> None:
        if self.n is None:
            self.n = 1
        if self.stream is None:
            self.stream = False
        if self.ignore_eos is None:
            self.ignore_eos = False


class ChatCompletionRequest(SamplingFields, kw_only=True):
    # The fields a hostile body can make huge (250,000 small messages, 150,000 tools) stay
    # raw JSON in the first decode, which runs on the event loop: scanning them is several
    # times cheaper than building them, and they are decoded item by item in the worker
    # thread that builds the engine requests (``fermi.server.build.decode_items``).
    messages: list[msgspec.Raw]  # each a Message
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # The product's own thinking switch, then the conventions other servers accept.
    thinking: Literal["on", "off", "auto"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    think: bool | None = None  # Ollama
    # OpenAI's structured outputs, checked by the engine (fermi.grammar) so that a wrong
    # shape gets our own message and param. Raw: any JSON, decoded in the worker.
    response_format: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    # Checked by the engine (fermi.text.tools), which names the field that is wrong.
    tools: list[msgspec.Raw] | None = None  # each any JSON
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI features this server does not have: refused when given (build.CHAT_UNSUPPORTED).
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    verbosity: str | None = None  # only "medium", the one length this server has
    store: bool | None = None  # only false: nothing is stored
    metadata: Any = None  # kept with stored completions: refused, as store is
    service_tier: str | None = None  # only "auto" or "default": the one tier there is


class CompletionRequest(SamplingFields, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool | None = False  # null: False (__post_init__)
    suffix: str | None = None
    best_of: int | None = None  # refused unless 1 (server-side candidates are not supported)
    # Structured outputs on raw prompts (vLLM accepts it here too; OpenAI has no such field).
    response_format: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)  # any JSON

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.echo is None:
            self.echo = False


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    input: str | list[Any]
    model: str | None = None
    dimensions: int | None = None
    # base64: each vector's little-endian float32 bytes, as OpenAI's (its SDK's default).
    encoding_format: Literal["float", "base64"] | None = None  # None: float
    user: str | None = None


# -- responses ------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens whose KV cache was reused, not prefilled


class UsageBody(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class AssistantMessage(msgspec.Struct):
    role: str
    content: str | None
    # reasoning_content is vLLM's original name, reasoning its newer one: clients read either.
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallBody] | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageBody


class ChunkFunction(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(msgspec.Struct, omit_defaults=True):
    """A streamed piece of a call: the first has id, type and name (and arguments ""),
    the following ones a fragment of the arguments."""

    index: int
    id: str | None = None
    type: str | None = None
    function: ChunkFunction | None = None


class ChunkDelta(msgspec.Struct, omit_defaults=True):
    """A streamed delta carries only the fields that changed."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: UsageBody | None = None


class TextChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class TextCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[TextChoice]
    usage: UsageBody | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "fermi"
    max_model_len: int | None = None


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class Embedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string with encoding_format base64


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


ENCODER = msgspec.json.Encoder()
CHAT_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
EMBEDDING_DECODER = msgspec.json.Decoder(EmbeddingRequest)
