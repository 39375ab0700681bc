"""``POST /v1/responses`` bodies -> an engine request, through the chat request builder.

The Responses API's shapes are mapped onto the chat ones the engine already takes: input
items become chat messages (``instructions`` the system message, ``function_call`` items
an assistant turn's tool calls, ``function_call_output`` items tool turns), flat function
tools the chat tools, ``text.format`` a ``response_format``, ``reasoning.effort`` the
thinking switch. Checking them is the engine's (fermi.text.tools, fermi.grammar); its
errors come back under this API's field names.

This server keeps no responses: a field that needs a stored one (``previous_response_id``,
``conversation``, ``background``, an ``item_reference``) is refused, naming it; ``store``
is accepted and keeps nothing. A store in memory would tie a conversation to one process:
lost on a restart, on eviction past its bound, and on another replica behind a load
balancer, each a failure the client meets mid-conversation. A client that sends the whole
conversation works with any server, as OpenAI's own ``store: false`` does.
"""

from __future__ import annotations

from typing import Any

import msgspec

from fermi.engine.api import Engine
from fermi.engine.requests import SamplingSettings, check_room
from fermi.engine.types import GenerationRequest, Thinking
from fermi.errors import RequestError
from fermi.server.build import check_counts, check_top_logprobs, decode_items, effort_thinking
from fermi.server.errors import ApiError
from fermi.server.responses_protocol import (
    ResponsesContentPart,
    ResponsesInputItem,
    ResponsesRequest,
)

_INPUT_ITEM = msgspec.json.Decoder(ResponsesInputItem)  # one item of input
_TOOL = msgspec.json.Decoder(dict[str, Any])  # one item of tools
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
LOGPROBS = "message.output_text.logprobs"
# include values this server can answer. Reasoning is returned in full as text, and
# reasoning items sent back are ignored, so there is nothing to encrypt: that one is
# accepted and adds nothing.
INCLUDABLE = (LOGPROBS, "reasoning.encrypted_content")
MAX_METADATA = 16  # OpenAI's bounds: 16 pairs, keys of 64 and values of 512 characters
NOT_STORED = (
    "this server does not store responses (store is accepted, and nothing is kept): "
    "send the whole conversation in input instead"
)


def not_stored(method: str, path: str) -> ApiError:
    """The answer to retrieving, cancelling or deleting a response: none is kept."""
    return ApiError(
        404,
        f"{method} {path}: this server does not store responses, so none can be retrieved, "
        "cancelled or deleted (POST /v1/responses answers statelessly; store is accepted and "
        "nothing is kept)",
        code="not_found",
    )


def response_request(engine: Engine, body: ResponsesRequest) -> GenerationRequest:
    """The engine request of a Responses body; ApiError naming the field that is wrong."""
    check_counts(engine, body.input if isinstance(body.input, list) else [], body.tools)
    _refuse_unsupported(body)
    thinking = _thinking(body)
    kwargs: dict[str, Any] = dict(
        messages=input_messages(body),
        thinking=thinking,
        tools=chat_tools(body.tools),
        tool_choice=chat_tool_choice(body.tool_choice),
        # (a setting of tools, sent by clients with or without them: on this API, unlike
        # chat's, no tools makes it moot, not an error)
        parallel_tool_calls=body.parallel_tool_calls if body.tools else None,
        truncate=body.truncation == "auto",
    )
    if body.text is not None and body.text.format is not None:
        kwargs["response_format"] = response_format(body.text.format)
    limit = body.max_output_tokens
    # Log-probabilities come back only when included, as OpenAI's (top_logprobs alone
    # returns none); top_logprobs is then the number of alternatives.
    logprobs = (body.top_logprobs or 0) if LOGPROBS in (body.include or ()) else None
    try:
        settings = SamplingSettings.taken_from(body, max_tokens=limit, logprobs=logprobs)
        request = engine.build_request(**kwargs, settings=settings)
        check_room(request, limit, "max_output_tokens")
    except RequestError as exc:
        param = wire_param(exc.param)
        message = exc.message
        if exc.param == "max_tokens" and message.startswith("max_tokens"):
            message = "max_output_tokens" + message.removeprefix("max_tokens")
        raise ApiError(400, message, param=param, code=exc.code) from None
    return request


def _refuse_unsupported(body: ResponsesRequest) -> None:
    for name in ("previous_response_id", "conversation"):
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} needs stored responses; {NOT_STORED}", param=name)
    if body.background:
        raise ApiError(
            400,
            "background responses are fetched later, and this server does not store "
            "responses: send the request with background false (or stream it)",
            param="background",
        )
    if body.prompt is not None:
        raise ApiError(
            400,
            "prompt names a prompt template stored by OpenAI; send its text in instructions "
            "and input instead",
            param="prompt",
        )
    if body.context_management is not None:
        raise ApiError(
            400, "context_management (compaction) is not supported", param="context_management"
        )
    for i, value in enumerate(body.include or ()):
        if value not in INCLUDABLE:
            raise ApiError(
                400,
                f"include value {value!r} is not supported; this server can include only "
                + ", ".join(INCLUDABLE),
                param=f"include[{i}]",
            )
    check_top_logprobs(body.top_logprobs)
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise ApiError(
            400,
            f"text.verbosity {body.text.verbosity!r} is not supported; the model writes at "
            "its own length (medium)",
            param="text.verbosity",
        )
    if body.max_tool_calls is not None and body.max_tool_calls < 0:
        raise ApiError(400, "max_tool_calls must be 0 or more", param="max_tool_calls")
    metadata = body.metadata or {}
    if len(metadata) > MAX_METADATA:
        raise ApiError(400, f"metadata takes at most {MAX_METADATA} pairs", param="metadata")
    if any(len(key) > 64 or len(value) > 512 for key, value in metadata.items()):
        raise ApiError(
            400,
            "metadata keys are at most 64 characters and values at most 512",
            param="metadata",
        )


def _thinking(body: ResponsesRequest) -> Thinking:
    effort = body.reasoning.effort if body.reasoning is not None else None
    return "auto" if effort is None else effort_thinking(effort, "reasoning.effort")


# -- input ------------------------------------------------------------------------------


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as the chat messages the template renders."""
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    if body.input is None:
        raise ApiError(
            400,
            "input is required: this server does not store responses, so every request "
            "carries the whole conversation",
            param="input",
            code="missing_required_parameter",
        )
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    if not body.input:
        raise ApiError(400, "input must not be empty", param="input")
    names: dict[str, str] = {}  # call_id -> the function's name, for the outputs
    for i, item in enumerate(decode_items(body.input, _INPUT_ITEM, "input")):
        where = f"input[{i}]"
        kind = item.type or ("message" if item.role is not None else None)
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call_id, name = _call(item, where)
            names[call_id] = name
            turn = messages[-1] if messages else None
            if turn is None or turn["role"] != "assistant":
                turn = {"role": "assistant", "content": ""}
                messages.append(turn)
            call = {"id": call_id, "type": "function"}
            call["function"] = {"name": name, "arguments": item.arguments}
            turn.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append(_call_output(item, where, names))
        elif kind == "reasoning":
            continue  # the template renders no past reasoning; it is returned, not read back
        elif kind == "item_reference":
            raise ApiError(
                400, f"an item_reference needs stored items; {NOT_STORED}", param=f"{where}.id"
            )
        elif kind is None:
            raise ApiError(
                400,
                "an input item needs a type (or a role, for a message)",
                param=f"{where}.type",
                code="missing_required_parameter",
            )
        else:
            raise ApiError(
                400,
                f"input items of type {kind!r} are not supported; this server takes message, "
                "function_call, function_call_output and reasoning items",
                param=f"{where}.type",
            )
    return messages


def _required(value: Any, where: str, field: str) -> Any:
    if value is None:
        raise ApiError(
            400,
            f"{where}.{field} is required",
            param=f"{where}.{field}",
            code="missing_required_parameter",
        )
    return value


def _message(item: ResponsesInputItem, where: str) -> dict[str, Any]:
    if item.role not in ROLES:
        raise ApiError(
            400,
            f"role must be one of {', '.join(ROLES)}, not {item.role!r}",
            param=f"{where}.role",
        )
    content = _required(item.content, where, "content")
    if not isinstance(content, str):
        content = _text(content, f"{where}.content")
    return {"role": item.role, "content": content}


def _text(parts: list[ResponsesContentPart], where: str) -> str:
    """Content parts joined into one string; anything but text is refused, naming it."""
    texts = []
    for j, part in enumerate(parts):
        text = part.refusal if part.type == "refusal" else part.text
        if part.type not in (*TEXT_PARTS, "refusal"):
            raise ApiError(
                400,
                f"content part of type {part.type!r} is not supported; this model takes text only",
                param=f"{where}[{j}].type",
            )
        field = "refusal" if part.type == "refusal" else "text"
        texts.append(_required(text, f"{where}[{j}]", field))
    return "".join(texts)


def _call(item: ResponsesInputItem, where: str) -> tuple[str, str]:
    call_id = _required(item.call_id, where, "call_id")
    name = _required(item.name, where, "name")
    _required(item.arguments, where, "arguments")
    return call_id, name


def _call_output(item: ResponsesInputItem, where: str, names: dict[str, str]) -> dict[str, Any]:
    call_id = _required(item.call_id, where, "call_id")
    if call_id not in names:
        raise ApiError(
            400,
            f"no function_call item with call_id {call_id!r} comes before this output in "
            f"input; {NOT_STORED}",
            param=f"{where}.call_id",
        )
    output = _required(item.output, where, "output")
    if not isinstance(output, str):
        output = _text(output, f"{where}.output")
    return {"role": "tool", "tool_call_id": call_id, "name": names[call_id], "content": output}


# -- tools and formats --------------------------------------------------------------------


def chat_tools(tools: list[msgspec.Raw] | None) -> list[dict[str, Any]] | None:
    """Flat function tools (``{"type": "function", "name", "description", "parameters",
    "strict"}``) in the chat shape; a tool of any other type is refused, naming its type."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(decode_items(tools, _TOOL, "tools")):
        kind = tool.get("type")
        if kind != "function":
            raise ApiError(
                400,
                f"tools of type {kind!r} are not supported; this server offers function tools "
                "only (the model calls them, the client runs them)",
                param=f"tools[{i}].type",
            )
        keys = ("name", "description", "parameters", "strict")
        out.append({"type": "function", "function": {k: tool[k] for k in keys if k in tool}})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """``"auto" | "none" | "required" | {"type": "function", "name": ...}`` in the chat
    shape; the chat checks (fermi.text.tools) name anything else."""
    if not isinstance(choice, dict):
        return choice
    kind = choice.get("type")
    if kind != "function":
        raise ApiError(
            400,
            f"tool_choice of type {kind!r} is not supported; give auto, none, required or "
            '{"type": "function", "name": ...}',
            param="tool_choice",
        )
    name = choice.get("name")
    if not isinstance(name, str) or not name:  # (the chat checks would show chat's shape)
        raise ApiError(
            400,
            'a named tool_choice is {"type": "function", "name": ...}; this one has no name',
            param="tool_choice.name",
        )
    return {"type": "function", "function": {"name": name}}


def response_format(value: dict[str, Any]) -> dict[str, Any]:
    """``text.format`` as chat's ``response_format``: a json_schema format's fields move
    under ``json_schema``."""
    if value.get("type") != "json_schema":
        return value
    return {"type": "json_schema", "json_schema": {k: v for k, v in value.items() if k != "type"}}


def wire_param(param: str | None) -> str | None:
    """An engine error's field under this API's name."""
    if param is None:
        return None
    if param == "messages":
        return "input"
    if param == "max_tokens":
        return "max_output_tokens"
    if param == "thinking":  # (asked for by reasoning.effort here)
        return "reasoning.effort"
    if param.startswith("response_format"):
        rest = param.removeprefix("response_format").replace(".json_schema", "", 1)
        return "text.format" + rest
    if param.startswith("tools["):
        return param.replace(".function.", ".", 1)
    return param
