"""Translation between fermi.v1 messages and the engine's types, and errors to status codes."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import grpc

from fermi.engine.requests import SamplingSettings, check_roles
from fermi.engine.types import Delta, Thinking
from fermi.errors import EngineOverloadedError, FermiError, RequestError, quoted
from fermi.rpc.generated import fermi_pb2 as pb
from fermi.rpc.sessions import SessionBusyError, SessionLimitError, SessionNotFoundError
from fermi.sampling import MAX_LOGPROBS
from fermi.text.tools import check_call_turns

_THINKING: dict[int, Thinking] = {
    pb.THINKING_AUTO: "auto",
    pb.THINKING_ON: "on",
    pb.THINKING_OFF: "off",
}


def thinking_mode(value: int) -> Thinking:
    if value not in _THINKING:
        raise RequestError(f"thinking must be THINKING_AUTO, _ON or _OFF, not {value}", "thinking")
    return _THINKING[value]


def sampling_settings(params: pb.SamplingParams) -> SamplingSettings:
    """The settings a message sets; unset optional fields stay unset (the model's defaults).

    The message's fields are named as the settings, except ``top_logprobs``."""
    given: dict[str, Any] = {field.name: value for field, value in params.ListFields()}
    if "top_logprobs" in given:
        if not 0 <= given["top_logprobs"] <= MAX_LOGPROBS:
            raise RequestError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
        given["logprobs"] = given.pop("top_logprobs")
    if "stop" in given:
        given["stop"] = list(given["stop"])
    if "logit_bias" in given:
        given["logit_bias"] = dict(given["logit_bias"])
    return SamplingSettings(**given)


def grammar(request: pb.GenerateRequest | pb.ChatRequest) -> dict[str, Any]:
    """The ``grammar=`` keyword argument of a request that sets one (else none)."""
    if not request.HasField("grammar"):
        return {}
    kind = request.grammar.WhichOneof("kind")
    if kind is None:
        raise RequestError("set one of json_schema, json_object, regex or lark", "grammar")
    value = getattr(request.grammar, kind)
    if kind == "json_object" and not value:
        raise RequestError("json_object must be true when it is the grammar", "grammar")
    return {"grammar": {"type": kind, "value": value}}


def generate_kwargs(request: pb.GenerateRequest) -> dict[str, Any]:
    """``Engine.build_request`` keyword arguments for a Generate call."""
    kwargs: dict[str, Any] = {
        "settings": sampling_settings(request.sampling),
        "truncate": request.truncate,
        **grammar(request),
    }
    # Checked whatever the input, as HTTP checks every field it is sent.
    thinking = thinking_mode(request.thinking)
    which = request.WhichOneof("input")
    if which != "conversation":
        _refuse_conversation_fields(request)
    if which == "prompt":
        kwargs["prompt"] = request.prompt
    elif which == "prompt_token_ids":
        kwargs["prompt_token_ids"] = list(request.prompt_token_ids.ids)
    elif which == "conversation":
        messages = [_message(m) for m in request.conversation.messages]
        check_roles(messages, "conversation.messages")  # named as on this wire
        _check_calls(messages, "conversation.messages")
        kwargs["messages"] = messages
        kwargs["thinking"] = thinking
        kwargs.update(tool_kwargs(request))
    else:
        raise RequestError(
            "set one of prompt, prompt_token_ids or conversation",
            "input",
            "missing_required_parameter",
        )
    return kwargs


def _check_calls(messages: list[dict[str, Any]], field: str) -> None:
    """Tool calls and results where they belong (``check_call_turns``, as HTTP checks them),
    and no ``tool_call_id`` outside a tool message: every Message of this wire has the
    field, and one another role does not have is refused, not dropped unseen."""
    for i, message in enumerate(messages):
        if message["role"] != "tool" and "tool_call_id" in message:
            role, at = message["role"], f"{field}[{i}].tool_call_id"
            raise RequestError(f"a {role} message has no tool_call_id", at)
    check_call_turns(messages, field)


def _refuse_conversation_fields(request: pb.GenerateRequest) -> None:
    """These fields shape the chat template's rendering, which a prompt does not have: a
    request that sets one is refused, not answered without it (as ``build_request`` refuses
    tools without messages)."""
    given = {
        "tools": bool(request.tools),
        "tool_choice": bool(request.tool_choice),
        "parallel_tool_calls": request.HasField("parallel_tool_calls"),
        "thinking": request.thinking != pb.THINKING_AUTO,
    }
    for field, is_set in given.items():
        if is_set:
            verb = "need" if field == "tools" else "needs"
            raise RequestError(
                f"{field} {verb} a conversation (a prompt is not rendered with the chat template)",
                field,
            )


def chat_turn(request: pb.ChatRequest) -> list[dict[str, Any]]:
    """The messages a Chat call adds before the reply: the user's message, or the results
    of the calls the session's last reply made."""
    if request.tool_results:
        if request.HasField("message"):
            raise RequestError("send message or tool_results, not both", "tool_results")
        results = []
        for i, m in enumerate(request.tool_results):
            if (m.role or "tool") != "tool" or not m.tool_call_id:
                raise RequestError(
                    "a tool result has role tool (or none) and the tool_call_id it answers",
                    f"tool_results[{i}]",
                )
            if m.tool_calls:
                where = f"tool_results[{i}].tool_calls"
                raise RequestError("a tool result has no tool_calls", where)
            results.append({"role": "tool", "content": m.content, "tool_call_id": m.tool_call_id})
        return results
    if not request.HasField("message"):
        raise RequestError(
            "send message (the user's turn) or tool_results",
            "message",
            "missing_required_parameter",
        )
    message = request.message
    role = message.role or "user"
    if role != "user":
        raise RequestError(f"message.role must be user, not {quoted(role)}", "message.role")
    if message.tool_calls or message.tool_call_id:  # (an assistant's or a tool's fields)
        field = "message.tool_calls" if message.tool_calls else "message.tool_call_id"
        raise RequestError(f"a user message has no {field.split('.')[1]}", field)
    return [{"role": "user", "content": message.content}]


def check_tool_results(results: list[dict[str, Any]], history: list[dict] | None) -> None:
    """Each of a Chat turn's tool results answers a call of the session's last reply, once;
    ``history`` is the session's conversation (None: the turn starts a session)."""
    last = history[-1] if history else {}
    pending = (
        [c["id"] for c in last.get("tool_calls", ())] if last.get("role") == "assistant" else []
    )
    answered: set[str] = set()
    for i, result in enumerate(results):
        call_id, param = result["tool_call_id"], f"tool_results[{i}].tool_call_id"
        if call_id in answered:
            raise RequestError(f"{quoted(call_id)} is answered twice", param)
        if call_id not in pending:
            if history is None:
                why = "a new session has no tool calls"
            elif not pending:
                why = "the session's last reply called no tool"
            elif len(pending) == 1:
                why = f"the pending call is {quoted(pending[0])}"
            else:
                why = f"the pending calls are {', '.join(quoted(p) for p in pending)}"
            raise RequestError(f"{quoted(call_id)} answers no call: {why}", param)
        answered.add(call_id)


def generate_error(exc: RequestError, which: str | None) -> RequestError:
    """An engine error named by the engine's keyword (``messages``, ``prompt``) under the
    field this wire has: ``conversation.messages``, or ``prompt_token_ids`` when the
    request's input is token ids."""
    param = {"messages": "conversation.messages", "prompt": which}.get(exc.param or "")
    if param is None or param == exc.param:
        return exc
    return RequestError(exc.message, param, exc.code, hint=exc.hint)


def chat_error(exc: RequestError, turn_field: str) -> RequestError:
    """An engine error about the rendered conversation (``messages``), named for Chat,
    which has no such field: the turn's field (``message`` or ``tool_results``), and for a
    conversation over the context the advice a Chat client can take (it has no truncate)."""
    if exc.param != "messages":
        return exc
    hint = exc.hint
    if exc.code == "context_length_exceeded":
        hint = (
            "the conversation with this message does not fit the context: shorten the message, "
            "or start a new session"
            if turn_field == "message"
            else "the conversation with these tool results does not fit the context: shorten "
            "them, or start a new session"
        )
    return RequestError(exc.message, turn_field, exc.code, hint=hint)


def _message(m: pb.Message) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def tool_kwargs(request: pb.GenerateRequest | pb.ChatRequest) -> dict[str, Any]:
    """tools (JSON texts), tool_choice (a mode or a function's name), parallel_tool_calls."""
    tools = []
    for i, text in enumerate(request.tools):
        try:
            tools.append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise RequestError(f"a tool must be JSON: {exc}", f"tools[{i}]") from None
        except RecursionError:
            raise RequestError("a tool's JSON is nested too deeply", f"tools[{i}]") from None
    choice: Any = request.tool_choice or None
    if choice not in (None, "none", "auto", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    kwargs: dict[str, Any] = {"tools": tools or None, "tool_choice": choice}
    if request.HasField("parallel_tool_calls"):
        kwargs["parallel_tool_calls"] = request.parallel_tool_calls
    return kwargs


def response(delta: Delta, session_id: str = "") -> pb.GenerateResponse:
    out = pb.GenerateResponse(
        text=delta.text,
        reasoning=delta.reasoning,
        token_ids=delta.token_ids,
        finish_reason=delta.finish_reason or "",
        session_id=session_id,
    )
    for lp in delta.logprobs or ():
        out.logprobs.append(
            pb.TokenLogprob(
                token_id=lp.token_id,
                token=lp.token,
                logprob=lp.logprob,
                top=[
                    pb.TopLogprob(
                        token_id=a.token_id,
                        token=a.token,
                        logprob=a.logprob,
                        token_bytes=a.token_bytes,
                    )
                    for a in lp.top
                ],
                token_bytes=lp.token_bytes,
            )
        )
    for call in delta.tool_calls or ():
        out.tool_calls.append(
            pb.ToolCallDelta(
                index=call.index, id=call.id or "", name=call.name or "", arguments=call.arguments
            )
        )
    if delta.usage is not None:
        u = delta.usage
        out.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.total_tokens,
                cached_tokens=u.cached_tokens,
            )
        )
    return out


class Status(NamedTuple):
    """How a failed call ends: its status code, readable details and trailing metadata."""

    code: grpc.StatusCode
    details: str
    metadata: tuple[tuple[str, str], ...] = ()


# Trailing metadata keys of a refused request: RequestError's code and param, for clients
# that act on the kind of error without reading its message.
ERROR_CODE_KEY = "fermi-error-code"
ERROR_PARAM_KEY = "fermi-error-param"


# The most UTF-8 bytes of a status's details. grpc-message percent-encodes every byte
# outside printable ASCII, so this is at most 3 KiB on the wire, well under the 8 KiB (soft)
# and 16 KiB (hard) limits clients set on trailing metadata: over them the client gets
# RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of the status.
DETAILS_LIMIT = 1024


def status_of(exc: BaseException) -> Status:
    """The status for an error raised while serving a call."""
    status = _status_of(exc)
    return status._replace(details=_capped(status.details))


def _capped(details: str) -> str:
    data = details.encode()
    if len(data) <= DETAILS_LIMIT:
        return details
    cut = data[: DETAILS_LIMIT - len("…".encode())].decode(errors="ignore")
    return f"{cut}…"


# The Python API's advice in this wire's words (its enum values and fields).
_GRPC_HINTS = {
    "use thinking='auto' or 'off'": "use THINKING_AUTO or THINKING_OFF",
    "pass truncate=True to keep the end of the prompt": "set truncate: true to keep the end "
    "of the prompt",
}


def _status_of(exc: BaseException) -> Status:
    if isinstance(exc, RequestError):
        said = exc.message
        hint = _GRPC_HINTS.get(exc.hint, exc.hint) if exc.hint else None
        if hint:
            said = f"{said} ({hint})"
        detail = f"{exc.param}: {said}" if exc.param else said
        metadata = ((ERROR_CODE_KEY, exc.code),)
        if exc.param:
            metadata += ((ERROR_PARAM_KEY, exc.param),)
        return Status(grpc.StatusCode.INVALID_ARGUMENT, detail, metadata)
    if isinstance(exc, SessionNotFoundError):
        return Status(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, SessionBusyError):
        return Status(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, (EngineOverloadedError, SessionLimitError)):
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, FermiError):
        return Status(grpc.StatusCode.INTERNAL, str(exc))
    return Status(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
