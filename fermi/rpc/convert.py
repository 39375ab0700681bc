"""Translation between fermi.v1 messages and the engine's types, and errors to status codes."""

from __future__ import annotations

from typing import Any

import grpc

from fermi.engine.types import Delta, Thinking
from fermi.errors import EngineOverloadedError, FermiError, RequestError
from fermi.rpc.generated import fermi_pb2 as pb
from fermi.rpc.sessions import SessionBusyError, SessionLimitError, SessionNotFoundError

ROLES = ("system", "user", "assistant", "tool")
_THINKING: dict[int, Thinking] = {
    pb.THINKING_AUTO: "auto",
    pb.THINKING_ON: "on",
    pb.THINKING_OFF: "off",
}
_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens")


def thinking_mode(value: int) -> Thinking:
    if value not in _THINKING:
        raise RequestError(f"thinking must be THINKING_AUTO, _ON or _OFF, not {value}", "thinking")
    return _THINKING[value]


def sampling_kwargs(params: pb.SamplingParams) -> dict[str, Any]:
    """``Engine.build_request`` keyword arguments; unset optional fields stay unset."""
    kwargs: dict[str, Any] = {k: getattr(params, k) for k in _OPTIONAL if params.HasField(k)}
    kwargs["presence_penalty"] = params.presence_penalty
    kwargs["frequency_penalty"] = params.frequency_penalty
    kwargs["stop"] = list(params.stop)
    kwargs["ignore_eos"] = params.ignore_eos
    if params.HasField("top_logprobs"):
        kwargs["logprobs"] = params.top_logprobs
    return kwargs


def message_dict(message: pb.Message, field: str) -> dict[str, str]:
    if message.role not in ROLES:
        raise RequestError(f"role must be one of {', '.join(ROLES)}, not {message.role!r}", field)
    return {"role": message.role, "content": message.content}


def generate_kwargs(request: pb.GenerateRequest) -> dict[str, Any]:
    """``Engine.build_request`` keyword arguments for a Generate call."""
    kwargs = sampling_kwargs(request.sampling)
    kwargs["truncate"] = request.truncate
    which = request.WhichOneof("input")
    if which == "prompt":
        kwargs["prompt"] = request.prompt
    elif which == "prompt_token_ids":
        kwargs["prompt_token_ids"] = list(request.prompt_token_ids.ids)
    elif which == "conversation":
        kwargs["messages"] = [
            message_dict(m, f"conversation.messages[{i}].role")
            for i, m in enumerate(request.conversation.messages)
        ]
        kwargs["thinking"] = thinking_mode(request.thinking)
    else:
        raise RequestError("set one of prompt, prompt_token_ids or conversation", "input")
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
                top=[pb.TopLogprob(token_id=t, token=s, logprob=p) for t, s, p in lp.top],
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


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and readable details for an error raised while serving a call."""
    if isinstance(exc, RequestError):
        detail = f"{exc.param}: {exc}" if exc.param else str(exc)
        return grpc.StatusCode.INVALID_ARGUMENT, detail
    if isinstance(exc, SessionNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, SessionBusyError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (EngineOverloadedError, SessionLimitError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, FermiError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
