"""Request bodies -> engine requests: thinking switches, sampling fields, n, limits."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgspec

from fermi.engine.api import Engine
from fermi.engine.requests import SamplingSettings, check_room
from fermi.engine.types import GenerationRequest, Thinking
from fermi.errors import RequestError
from fermi.heap import gc_paused
from fermi.sampling import MAX_LOGPROBS
from fermi.server.errors import ApiError, bad_body
from fermi.server.protocol import ChatCompletionRequest, CompletionRequest, Message, SamplingFields
from fermi.text.thinking import SWITCHES
from fermi.text.tools import check_call_turns

MAX_CHOICES = 16  # n per request; more would starve everyone else's slots
# Prompts per completions request, checked before any is built: 400,000 one-token prompts
# (2 MB of JSON) took 21 s to build, only to be refused as more than the server holds.
MAX_PROMPTS = 64
# Tools per request, as OpenAI's API allows. Checked before any tool is decoded: 150,000
# small tools took ~1 s to decode and check, and freeing them held the GIL in one go.
MAX_TOOLS = 128
# /v1/completions without max_tokens writes this many, as OpenAI's does; chat completions
# without one run to the end of the context (OpenAI's chat default).
COMPLETION_MAX_TOKENS = 16


def decode_body(decoder: msgspec.json.Decoder, raw: bytes) -> Any:
    """A request body as its Struct; a 400 naming the field for anything else.

    On the event loop: hostile multi-megabyte bodies decode or fail within tens of ms here,
    and decoding in a thread gave no shorter /health gaps, msgspec keeping the GIL
    (``perf/health_hostile_bodies.py``)."""
    try:
        with gc_paused():
            return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise bad_body(exc, raw=raw) from None
    except RecursionError:
        # msgspec's own depth limit: arrays or objects nested thousands deep.
        raise ApiError(
            400, "the request body nests JSON arrays or objects too deeply", code="invalid_json"
        ) from None


_ANY = msgspec.json.Decoder()
MESSAGE_DECODER = msgspec.json.Decoder(Message)


def check_counts(engine: Engine, messages: list, tools: list | None) -> None:
    """Refuse lists that cannot be right before decoding any item: more tools than
    :data:`MAX_TOOLS`, or more messages than the context has tokens (every chat template
    renders a message as one token at least: its role's marker)."""
    if tools is not None and len(tools) > MAX_TOOLS:
        raise ApiError(
            400, f"tools takes at most {MAX_TOOLS} tools, not {len(tools)}", param="tools"
        )
    if len(messages) > engine.max_seq_len:
        raise ApiError(
            400,
            f"{len(messages)} messages cannot fit in this engine's context of "
            f"{engine.max_seq_len} tokens (a message takes one token at least)",
            param="messages",
            code="context_length_exceeded",
        )


def decode_items(items: list[msgspec.Raw], decoder: msgspec.json.Decoder, field: str) -> list:
    """The items of a list the first decode kept raw (``protocol.py``), decoded one by one
    in the worker thread; a 400 naming the item's field, as a whole-body decode would."""
    out = []
    for i, raw in enumerate(items):
        out.append(_decode(decoder, raw, f"{field}[{i}]"))
    return out


def decode_raw(raw: msgspec.Raw, field: str) -> Any:
    """A field the first decode kept raw, as Python values; None when absent or null."""
    if not raw or bytes(raw) == b"null":
        return None
    return _decode(_ANY, raw, field)


def _decode(decoder: msgspec.json.Decoder, raw: msgspec.Raw, at: str) -> Any:
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise bad_body(exc, at, bytes(raw)) from None
    except RecursionError:
        raise ApiError(
            400, "the request body nests JSON arrays or objects too deeply", code="invalid_json"
        ) from None


def resolve_thinking(body: ChatCompletionRequest) -> Thinking:
    """The product's switch first, then the conventions other servers' clients send."""
    if body.thinking is not None:
        return body.thinking
    kwargs = body.chat_template_kwargs or {}
    # enable_thinking (Qwen3, SmolLM3) or thinking (Granite 3.3): clients send the switch of
    # the model they know; either means the same mode here, whatever the model's switch.
    for switch in SWITCHES:
        enable = kwargs.get(switch)
        if isinstance(enable, bool):
            return "on" if enable else "off"
    if body.think is not None:
        return "on" if body.think else "off"
    if body.reasoning_effort is not None:
        return effort_thinking(body.reasoning_effort, "reasoning_effort")
    return "auto"


# OpenAI's reasoning effort -> thinking (chat's reasoning_effort, Responses' reasoning.effort);
# absent (null) leaves the model's default ("auto"). On a model that cannot think, "on" is
# refused by the engine, as the product's own switch is.
EFFORT_THINKING: dict[str, Thinking] = {
    "none": "off",
    "minimal": "off",
    "low": "on",
    "medium": "on",
    "high": "on",
    "xhigh": "on",
    "max": "on",
}


def effort_thinking(effort: str, param: str) -> Thinking:
    thinking = EFFORT_THINKING.get(effort)
    if thinking is None:
        raise ApiError(
            400, f"{param} must be one of {', '.join(EFFORT_THINKING)}, not {effort!r}", param=param
        )
    return thinking


# OpenAI chat features this server does not have: a request that uses one is refused, not
# answered without it (unknown fields are ignored; these are known, and mean something).
CHAT_UNSUPPORTED = {
    "functions": "legacy function calling (functions) is not supported; send tools",
    "function_call": "legacy function calling (function_call) is not supported; send tool_choice",
    "audio": "audio output is not supported; this server writes text",
    "prediction": "predicted outputs (prediction) are not supported",
    "web_search_options": "web search is not supported",
}


# vLLM's request extensions this server does not have, on chat and completions alike: a
# vLLM client's request that sets one is refused, not answered as if it were not there.
_GUIDED = "vLLM's guided decoding is not supported; send response_format (json_schema)"
SAMPLING_UNSUPPORTED = {
    "min_tokens": "min_tokens is not supported (a reply may end sooner); leave it out",
    "stop_token_ids": "stop_token_ids is not supported; send stop strings (stop)",
    "include_stop_str_in_output": "include_stop_str_in_output is not supported: a stop string "
    "is never part of the reply",
    "guided_json": _GUIDED,
    "guided_regex": _GUIDED,
    "guided_choice": _GUIDED,
    "guided_grammar": _GUIDED,
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty (beam search) is not supported",
    "prompt_logprobs": "prompt_logprobs is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported; logit_bias shifts tokens",
    "bad_words": "bad_words is not supported; logit_bias -100 bans a token",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not supported",
}


def refuse_unsupported_sampling(body: SamplingFields) -> None:
    for field, message in SAMPLING_UNSUPPORTED.items():
        if getattr(body, field) is not None:
            raise ApiError(400, message, param=field)
    if body.skip_special_tokens not in (None, True):
        raise ApiError(
            400,
            "skip_special_tokens: only true is served (special tokens never reach the text)",
            param="skip_special_tokens",
        )


def refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    refuse_unsupported_sampling(body)
    refuse_stream_options_without_stream(body)
    for field, message in CHAT_UNSUPPORTED.items():
        if getattr(body, field) is not None:
            raise ApiError(400, message, param=field)
    if body.modalities is not None and any(m != "text" for m in body.modalities):
        raise ApiError(400, "only the text modality is supported", param="modalities")
    if body.verbosity not in (None, "medium"):  # as text.verbosity on /v1/responses
        raise ApiError(
            400,
            f"verbosity {body.verbosity!r} is not supported; the model writes at its own "
            "length (max_tokens bounds it)",
            param="verbosity",
        )
    if body.tools is not None and not body.tools:
        raise ApiError(400, "tools must not be empty; leave it out for no tools", param="tools")
    if body.store:
        raise ApiError(
            400, "this server does not store chat completions; leave store out", param="store"
        )
    if body.metadata is not None:
        raise ApiError(
            400,
            "metadata is kept with stored chat completions, which this server does not store",
            param="metadata",
        )
    if body.service_tier not in (None, "auto", "default"):
        raise ApiError(
            400,
            f"service_tier {body.service_tier!r} is not offered: this server has one tier "
            '("default")',
            param="service_tier",
        )


def check_top_logprobs(value: int | None) -> None:
    """Chat's and the Responses API's ``top_logprobs`` (the engine's keyword is ``logprobs``,
    which its own error names)."""
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(
            400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}", param="top_logprobs"
        )


def refuse_stream_options_without_stream(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true", param="stream_options")


def chat_messages(raw: list[msgspec.Raw]) -> list[dict[str, Any]]:
    """Messages as the chat template wants them; content parts joined into one string.
    Refused, as on OpenAI's API: a message without content (an assistant turn may carry
    only tool calls), and tool calls or results out of place (``check_call_turns``)."""
    out = []
    for i, message in enumerate(decode_items(raw, MESSAGE_DECODER, "messages")):
        content = message.content
        at = f"messages[{i}]"
        if isinstance(content, list):
            role = message.role
            parts = [_part_text(p, role, f"{at}.content[{j}]") for j, p in enumerate(content)]
            content = "".join(parts) if parts else None
        if content is None and not (message.role == "assistant" and message.tool_calls):
            instead = "; or tool_calls" if message.role == "assistant" else ""
            raise ApiError(
                400,
                f"a {message.role} message needs content: a string or a non-empty list of "
                f"parts{instead}",
                param=f"{at}.content",
            )
        item: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in message.tool_calls
            ]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        out.append(item)
    try:
        check_call_turns(out)
    except RequestError as exc:
        raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
    return out


def _part_text(part: Any, role: str, at: str) -> str:
    """The text of one content part: a text part's, or an assistant turn's refusal."""
    if part.type == "text":
        if part.text is None:
            raise ApiError(400, "a text part needs text (a string)", param=f"{at}.text")
        return part.text
    if part.type == "refusal" and role == "assistant":
        if part.refusal is None:
            raise ApiError(400, "a refusal part needs refusal (a string)", param=f"{at}.refusal")
        return part.refusal
    raise ApiError(
        400,
        f"content part of type {part.type!r} is not supported; this model takes text only",
        param=at,
    )


def chat_requests(engine: Engine, body: ChatCompletionRequest) -> list[GenerationRequest]:
    refuse_unsupported_chat(body)
    check_counts(engine, body.messages, body.tools)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    check_top_logprobs(body.top_logprobs)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    elif body.max_tokens is not None and body.max_tokens != max_tokens:
        raise ApiError(
            400,
            f"max_tokens ({body.max_tokens}) and max_completion_tokens ({max_tokens}) "
            "disagree; send one of them (max_tokens is the older name)",
            param="max_tokens",
        )
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    kwargs = dict(
        messages=chat_messages(body.messages),
        thinking=resolve_thinking(body),
        tools=None if body.tools is None else decode_items(body.tools, _ANY, "tools"),
        tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
    )
    response_format = decode_raw(body.response_format, "response_format")
    if response_format is not None:
        kwargs["response_format"] = response_format
    return _requests(engine, body, kwargs, max_tokens, field, logprobs, "messages")


def completion_requests(engine: Engine, body: CompletionRequest) -> list[GenerationRequest]:
    """One engine request per (prompt, choice), in OpenAI's order: prompt-major."""
    refuse_unsupported_sampling(body)
    refuse_stream_options_without_stream(body)
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != 1:
        raise ApiError(400, "best_of is not supported; use n", param="best_of")
    out = []
    response_format = decode_raw(body.response_format, "response_format")
    for prompt in _prompts(body.prompt):
        key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
        given: dict[str, Any] = {key: prompt}
        if response_format is not None:
            given["response_format"] = response_format
        out += _requests(
            engine,
            body,
            given,
            body.max_tokens,
            "max_tokens",
            body.logprobs,
            "prompt",
            default_max_tokens=COMPLETION_MAX_TOKENS,
        )
    return out


def _prompts(prompt: str | list[Any]) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of strings or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if len(prompt) > MAX_PROMPTS and isinstance(prompt[0], (str, list)):
        raise ApiError(
            400,
            f"prompt takes at most {MAX_PROMPTS} prompts, not {len(prompt)}",
            param="prompt",
        )
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(
        isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        for p in prompt
    ):
        return [list(p) for p in prompt]
    raise ApiError(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists, and not empty",
        param="prompt",
    )


def _requests(
    engine: Engine,
    body: SamplingFields,
    prompt: dict[str, Any],
    max_tokens: int | None,
    max_tokens_field: str,
    logprobs: int | None,
    prompt_field: str,
    default_max_tokens: int | None = None,
) -> list[GenerationRequest]:
    """The requests of one prompt. Asked-for ``max_tokens`` that do not fit are refused; the
    endpoint's default (when not asked) is clamped to the context."""
    if not 1 <= body.n <= MAX_CHOICES:
        raise ApiError(400, f"n must be between 1 and {MAX_CHOICES}, got {body.n}", param="n")
    limit = default_max_tokens if max_tokens is None else max_tokens
    try:
        settings = SamplingSettings.taken_from(body, max_tokens=limit, logprobs=logprobs)
        first = engine.build_request(**prompt, settings=settings)
        check_room(first, max_tokens, max_tokens_field)
    except RequestError as exc:
        raise _request_error(exc, prompt_field, max_tokens_field) from None
    if body.n == 1:
        return [first]
    # Seeded choices differ from each other yet reproduce: choice i draws with seed + i,
    # wrapped to the signed 64 bits a seed has (2**63 - 1 + 1 is -2**63).
    return [
        first
        if i == 0 or body.seed is None
        else replace(first, params=replace(first.params, seed=_wrapped_seed(body.seed + i)))
        for i in range(body.n)
    ]


def _wrapped_seed(seed: int) -> int:
    return (seed + 2**63) % 2**64 - 2**63


def _request_error(exc: RequestError, prompt_field: str, max_tokens_field: str) -> ApiError:
    """The engine's error under this endpoint's field names. The message goes without its
    hint: the hint is for the Python API (e.g. truncate=True, which HTTP cannot pass)."""
    param = exc.param
    if param == "max_tokens":
        param = max_tokens_field
    elif param in ("messages", "prompt", "prompt_token_ids"):
        param = prompt_field
    return ApiError(400, exc.message, param=param, code=exc.code)
