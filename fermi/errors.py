"""Errors a user can act on, raised where the problem is detected."""

from __future__ import annotations

from typing import Literal

# What kind of problem a RequestError is, in OpenAI's words: the HTTP and gRPC front ends
# map these (and the error's ``param``) to their own shapes, never the message text.
RequestErrorCode = Literal[
    "invalid_value",  # out of range, unknown choice, malformed content
    "invalid_type",  # a value of the wrong type (callers from JSON or gRPC)
    "missing_required_parameter",  # no prompt of any kind
    "context_length_exceeded",  # the prompt does not fit the engine's context
    "grammar_too_complex",  # a grammar needed more work per token than a request may take
]


class FermiError(Exception):
    """Base class of the errors Fermi raises on purpose."""


class ModelLoadError(FermiError):
    """A model folder, file or id cannot be loaded; the message names what is wrong."""


class RequestError(FermiError, ValueError):
    """A generation request is invalid (bad parameter, prompt too long, ...).

    ``param`` names the offending field where there is one; ``code`` says what is wrong
    with it. ``hint`` is advice for callers of the Python API (and gRPC), shown in
    parentheses after ``message``; front ends that cannot take it show ``message`` alone.
    """

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: RequestErrorCode = "invalid_value",
        *,
        hint: str | None = None,
    ) -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.message = message
        self.param = param
        self.code = code
        self.hint = hint


class EngineOverloadedError(FermiError):
    """The request queue is full; try again later."""


def quoted(value: object, limit: int = 64) -> str:
    """A client's value as an error message quotes it: its repr, cut to ``limit``
    characters with "…", so that an error never echoes megabytes back (gRPC clients refuse
    a status over 16 KiB; an HTTP error body would carry it all)."""
    return clipped(repr(value), limit)


def clipped(text: str, limit: int = 64) -> str:
    """``text``, or its first ``limit`` - 1 characters and "…" when it is longer."""
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
