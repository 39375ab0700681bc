"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re

import msgspec

from fermi.server.protocol import ENCODER, ErrorBody, ErrorDetail

# msgspec ends a validation message with " - at `$.messages[0].content`".
_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_WRONG_TYPE = re.compile(r"Expected `[^`]+`, got `[^`]+`")


class ApiError(Exception):
    """Raised anywhere in a handler; the app turns it into the matching HTTP response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def detail(self) -> ErrorDetail:
        return ErrorDetail(self.message, self.type, self.param, self.code)

    def body(self) -> bytes:
        return ENCODER.encode(ErrorBody(self.detail()))


# A \u escape of half a UTF-16 surrogate pair without its other half (msgspec refuses
# them, saying "Input data was truncated" for a high half).
_UNPAIRED = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def bad_body(exc: msgspec.DecodeError, at: str | None = None, raw: bytes = b"") -> ApiError:
    """A body that is not JSON, or JSON of the wrong shape: 400 naming the field. ``at``
    is where the decoded text sat in the body (``messages[3]`` for a message decoded on
    its own), so the field is named from the body's root; ``raw``: the text decoded."""
    text = str(exc)
    unpaired = None if isinstance(exc, msgspec.ValidationError) else _UNPAIRED.search(raw)
    if unpaired is not None:
        escape = unpaired.group().decode()
        return ApiError(
            400,
            f"the request body is not valid JSON: it holds {escape}, half of a UTF-16 "
            "surrogate pair without its other half, which is not text",
            code="invalid_json",
        )
    if at is not None:
        text = _within(text, at)
    match = _PATH.search(text)
    param = match.group(1) if match else ""
    missing = _MISSING.search(text)
    if missing:
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
    if isinstance(exc, msgspec.ValidationError):
        # The Python API's codes: a value of the wrong type, a field missing, a bad value.
        if _WRONG_TYPE.match(text):
            code = "invalid_type"
        elif missing:
            code = "missing_required_parameter"
        else:
            code = "invalid_value"
        return ApiError(400, text, param=param or None, code=code)
    return ApiError(400, f"the request body is not valid JSON: {text}", code="invalid_json")


def _within(text: str, at: str) -> str:
    """msgspec's message for a value decoded on its own, with its path from the body's root."""
    match = _PATH.search(text)
    if match is None:
        return f"{text} - at `$.{at}`"
    inner = match.group(1)
    path = at + ("." + inner if inner and not inner.startswith("[") else inner)
    return text[: match.start()] + f" - at `$.{path}`"


RETRY_AFTER_S = "1"


def overloaded(exc: Exception) -> ApiError:
    """The engine's queue is full (``EngineOverloadedError``): try again shortly."""
    return ApiError(
        429,
        str(exc),
        type="rate_limit_error",
        code="engine_overloaded",
        headers=(("retry-after", RETRY_AFTER_S),),
    )


def closed(exc: Exception) -> ApiError:
    """The engine is closed: the server is shutting down."""
    return ApiError(503, str(exc), type="server_error", headers=(("retry-after", RETRY_AFTER_S),))


def internal_error() -> ApiError:
    # The details go to the server log only: a client never sees a traceback.
    return ApiError(500, "internal server error; see the server log", type="server_error")
