"""Tool calling: OpenAI's ``tools`` / ``tool_choice`` checked, the model's call syntax parsed.

A model announces a call in the syntax its chat template taught it. Two are understood,
and which one a model uses is read from its template (:func:`tool_format`):

- ``hermes`` (Qwen3, Qwen2.5, DeepSeek-R1-Distill-Qwen): anywhere in the answer,
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call.
- ``llama3_json`` (Llama 3.1 / 3.2): the whole answer is ``{"name": ..., "parameters":
  {...}}``, optionally after ``<|python_tag|>``; several calls are separated by ``;``.

:class:`ToolCallParser` reads the answer as it streams (after the reasoning split) and
turns calls into :class:`ToolCallDelta` events: one that starts a call (index, id, name),
then fragments of its arguments, whose concatenation is the arguments' JSON text exactly as
the model wrote it. A call is committed once its name and the opening brace of its arguments
are seen; before that, text that stops looking like a call goes back to the content, so a
malformed call is content, never an error. :func:`parse_tool_calls` is the same parser fed
the whole answer at once.

For ``tool_choice`` ``required`` or a named function, :func:`call_grammar` is the grammar
that makes the model write a valid call (llguidance's Lark dialect with the argument schemas
embedded as ``%json``).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from fermi.errors import RequestError, quoted
from fermi.grammar import (
    DATA_KEYWORDS,
    Grammar,
    bounded_whitespace,
    check_min_properties,
    schema_objects,
)
from fermi.text.nesting import check_nesting
from fermi.text.tokenizer import template_variables

ToolFormat = Literal["hermes", "llama3_json"]
ToolChoiceMode = Literal["none", "auto", "required", "named"]

# OpenAI's rule for function names.
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# -- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is its arguments' JSON schema."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool = False

    def as_openai(self) -> dict[str, Any]:
        """The tool as OpenAI's request shape, which chat templates render."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        if self.strict:
            function["strict"] = True
        return {"type": "function", "function": function}

    @property
    def arguments_schema(self) -> dict[str, Any]:
        """What a forced call's arguments must match: ``parameters``, as an object (the
        parsers read a call's arguments as one; ``{}`` and a schema without ``type`` say
        nothing against that, and ``["object", "null"]`` is narrowed to it)."""
        schema = self.parameters if self.parameters is not None else {}
        return {**schema, "type": "object"}


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode = "auto"
    name: str | None = None  # the function, when mode is "named"


def check_call_turns(messages: list[dict[str, Any]], field: str = "messages") -> None:
    """Tool calls and their results where they belong in OpenAI-shaped messages (HTTP's chat
    completions, gRPC's conversations), as OpenAI's API places them: calls in an assistant
    turn only, and each tool message naming in ``tool_call_id`` a call of an earlier
    assistant turn (the template pairs them). A RequestError naming ``field[i]``'s key."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        role, at = message["role"], f"{field}[{i}]"
        if message.get("tool_calls"):
            if role != "assistant":
                raise RequestError(
                    f"a {role} message has no tool_calls: only an assistant message carries "
                    "tool_calls",
                    f"{at}.tool_calls",
                )
            calls.update(call["id"] for call in message["tool_calls"])
        if role != "tool":
            continue
        answered = message.get("tool_call_id")
        if answered is None:
            raise RequestError(
                "a tool message needs tool_call_id, the id of the call it answers",
                f"{at}.tool_call_id",
                "missing_required_parameter",
            )
        if answered not in calls:
            raise RequestError(
                f"tool_call_id {quoted(answered)} answers no tool call of an earlier assistant "
                "message",
                f"{at}.tool_call_id",
            )


def parse_tools(value: Any, param: str = "tools") -> tuple[Tool, ...]:
    """OpenAI's ``tools`` list (or :class:`Tool`s) checked; RequestError naming the field."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise RequestError("tools must be a list of function tools", param, "invalid_type")
    check_nesting([t.as_openai() if isinstance(t, Tool) else t for t in value], param)
    tools: list[Tool] = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if isinstance(item, Tool):
            _check_parameters(item.parameters, f"{where}.function.parameters")
            tools.append(item)
            continue
        if not isinstance(item, dict):
            raise RequestError("a tool must be an object", where, "invalid_type")
        if item.get("type") != "function":
            raise RequestError(
                f'only tools of type "function" are supported, not {quoted(item.get("type"))}',
                f"{where}.type",
            )
        function = item.get("function")
        if not isinstance(function, dict):
            raise RequestError("a function tool needs a function object", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise RequestError(
                f"a function name must be 1 to 64 letters, digits, _ or -, not {quoted(name)}",
                f"{where}.function.name",
            )
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise RequestError(
                "description must be a string", f"{where}.function.description", "invalid_type"
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise RequestError(
                "parameters must be a JSON schema object",
                f"{where}.function.parameters",
                "invalid_type",
            )
        _check_parameters(parameters, f"{where}.function.parameters")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError(
                "strict must be true or false", f"{where}.function.strict", "invalid_type"
            )
        tools.append(Tool(name, description, parameters, bool(strict)))
    names = [t.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RequestError(f"two tools are named {name!r}", f"{param}[{i}].function.name")
    return tuple(tools)


def parse_tool_choice(
    value: Any, tools: tuple[Tool, ...], param: str = "tool_choice"
) -> ToolChoice:
    """``"none"|"auto"|"required"|{"type": "function", "function": {"name": ...}}`` (or a
    :class:`ToolChoice`); None means auto with tools and none without, as OpenAI's."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, ToolChoice):
        choice = value
    elif isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise RequestError(
                f'tool_choice must be "none", "auto", "required" or a named function, '
                f"not {quoted(value)}",
                param,
            )
        choice = ToolChoice(value)  # type: ignore[arg-type]
    elif isinstance(value, dict):
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if value.get("type") != "function" or not isinstance(name, str):
            raise RequestError(
                'a named tool_choice is {"type": "function", "function": {"name": ...}}', param
            )
        choice = ToolChoice("named", name)
    else:
        raise RequestError("tool_choice must be a string or an object", param, "invalid_type")
    if choice.mode in ("required", "named") and not tools:
        raise RequestError(f"tool_choice {choice.mode} needs tools", param)
    if choice.mode == "named" and choice.name not in {t.name for t in tools}:
        raise RequestError(
            f"tool_choice names {quoted(choice.name)}, which is not among the tools", param
        )
    return choice


def tool_format(template: str | None) -> ToolFormat | None:
    """The call syntax a chat template teaches, or None when it renders no tools."""
    if not template:
        return None
    variables = template_variables(template)
    if variables is None or "tools" not in variables:
        return None
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template or '"parameters"' in template or "ipython" in template:
        return "llama3_json"
    return None


def check_tools_supported(
    fmt: ToolFormat | None, tools: tuple[Tool, ...], choice: ToolChoice, param: str = "tools"
) -> None:
    if tools and choice.mode != "none" and fmt is None:
        raise RequestError(
            "this model's chat template does not support tools (it renders no tools, or "
            "in a call syntax fermi does not parse: Hermes <tool_call> or Llama 3 JSON)",
            param,
        )


def _check_parameters(parameters: dict[str, Any] | None, param: str) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise RequestError("parameters must be a JSON schema object", param, "invalid_type")
    check_schema(parameters, param)
    kind = parameters.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise RequestError(  # (as OpenAI's API: a call's arguments are an object)
            f'parameters must describe an object (type "object"), not type {quoted(kind)}',
            f"{param}.type",
        )


def check_schema(schema: dict[str, Any], param: str) -> None:
    r"""Refuse a ``schema`` that is no JSON schema of any draft (the meta-schemas as
    ``jsonschema`` reads them: its own ``$schema``'s draft, else 2020-12 back to draft 4,
    so that an older tool's tuple ``items`` or boolean ``exclusiveMaximum`` still passes;
    patterns are not compiled here, ECMA's ``\p{L}`` being no Python regex), naming the
    keyword under ``param``: with ``tool_choice`` auto the schema only goes into the
    prompt, and a wrong one (``"type": "foo"``) was served."""
    try:
        text = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        raise RequestError("parameters must be JSON", param, "invalid_type") from None
    # Remembered by digest (an agent sends the same tools with every request), so that
    # the cache holds no schema: distinct 2 MB schemas would otherwise stay in memory.
    key = hashlib.sha256(text.encode()).digest()
    error = _SCHEMA_ERRORS.get(key, _UNSEEN)
    if error is _UNSEEN:
        error = _schema_error(schema)
        with _SCHEMA_LOCK:
            _SCHEMA_ERRORS[key] = error
            while len(_SCHEMA_ERRORS) > 1024:
                _SCHEMA_ERRORS.pop(next(iter(_SCHEMA_ERRORS)))
    if error is not None:
        at, message = error
        raise RequestError(f"not a valid JSON schema: {message}", param + at)


_SCHEMA_ERRORS: dict[bytes, tuple[str, str] | None] = {}
_SCHEMA_LOCK = threading.Lock()
_UNSEEN = object()


def _schema_error(schema: dict[str, Any]) -> tuple[str, str] | None:
    from jsonschema import validators

    drafts = (
        [validators.validator_for(schema)]
        if "$schema" in schema
        else [
            validators.Draft202012Validator,
            validators.Draft201909Validator,
            validators.Draft7Validator,
            validators.Draft6Validator,
            validators.Draft4Validator,
        ]
    )
    first = None
    try:
        for draft in drafts:
            # (no format checker: "pattern" is ECMA-262, which Python's re does not read)
            error = next(iter(draft(draft.META_SCHEMA).iter_errors(schema)), None)
            if error is None:
                return None
            first = first or error
    except RecursionError:
        return "", "nested too deeply"
    at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.path)
    return at, _short(first.message)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the grammar of required calls ------------------------------------------------------


def _call_schema(tools: tuple[Tool, ...], arguments_key: str) -> dict[str, Any]:
    """One schema for a call of any of ``tools``. An arguments schema that refers within
    itself (``$ref`` to ``#/$defs/...``, or ``#`` for recursion) moves to the call schema's
    ``$defs`` under its tool's name, its references rebased there."""
    defs: dict[str, Any] = {}
    options = []
    for t in tools:
        arguments = t.arguments_schema
        try:
            check_min_properties(arguments)
        except ValueError as exc:
            raise RequestError(f"unsupported tool parameters schema: {exc}", "tools") from None
        if _has_local_ref(arguments):
            key = f"fermi_arguments_{t.name}"
            # (without its "$id": moved, it would make "#" mean itself, not the root the
            # rebased references start from)
            moved = {k: v for k, v in arguments.items() if k != "$id"}
            defs[key] = _rebased(moved, f"#/$defs/{key}")
            arguments = {"$ref": f"#/$defs/{key}"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, arguments_key: arguments},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        schema = {**schema, "$defs": defs}
    return bounded_whitespace(schema)


def _has_local_ref(schema: Any) -> bool:
    return any(
        isinstance(ref := node.get("$ref"), str) and ref.startswith("#")
        for node in schema_objects(schema)
    )


def _rebased(schema: Any, base: str) -> Any:
    """``schema`` with each local reference ``#<pointer>`` made ``<base><pointer>``."""
    if isinstance(schema, list):
        return [_rebased(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in DATA_KEYWORDS:
            out[key] = value
        else:
            out[key] = _rebased(value, base)
    return out


def call_grammar(
    fmt: ToolFormat,
    tools: tuple[Tool, ...],
    choice: ToolChoice,
    parallel: bool = True,
    reasoning: Literal["none", "optional", "open"] = "none",
    tag_tokens: frozenset[str] = frozenset(),
) -> Grammar:
    """The output a ``required`` or named ``tool_choice`` allows: calls of the chosen
    functions, their arguments valid against their schemas. ``reasoning`` lets a think block
    come first: ``open`` when the prompt already opened it, ``optional`` when the model may.
    ``tag_tokens`` are the tags (``<tool_call>``, ``<think>``, ...) that the tokenizer has as
    added tokens: the grammar names those as tokens (llguidance matches an added token only
    by name, never by its text)."""
    allowed = tuple(t for t in tools if choice.mode != "named" or t.name == choice.name)
    many = parallel and choice.mode != "named"

    def tag(text: str) -> str:
        return text if text in tag_tokens else json.dumps(text)

    if fmt == "hermes":
        schema = _call_schema(allowed, "arguments")
        calls = 'call ("\\n" call)*' if many else "call"
        rules = [
            f"calls: {calls}",
            f'call: {tag(HERMES_OPEN)} "\\n" body "\\n" {tag(HERMES_CLOSE)}',
        ]
    else:
        schema = _call_schema(allowed, "parameters")
        calls = 'body ("; " body)*' if many else "body"
        rules = [f"calls: {calls}"]
    rules.append(f"body: %json {json.dumps(schema)}")
    think_open, think_close = tag("<think>"), tag("</think>")
    if reasoning == "open":
        start = f"start: THOUGHT {think_close} GAP calls"
    elif reasoning == "optional":
        start = f"start: ({think_open} THOUGHT {think_close} GAP)? calls"
    else:
        start = "start: calls"
    lines = [start, *rules]
    if reasoning != "none":
        lines += ["THOUGHT: /(?s:.*)/", "GAP: /[ \\t\\n]*/"]
    return Grammar.lark("\n".join(lines) + "\n")


# -- parsing the model's calls ----------------------------------------------------------


@dataclass
class ToolCallDelta:
    """One streamed piece of a call: the first of a call has ``id`` and ``name`` (and empty
    ``arguments``); the following ones only a fragment of the arguments' JSON text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text of the arguments object


def merge_calls(calls: list[ToolCall], deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """``calls`` with ``deltas`` applied (a start adds a call, a fragment extends one)."""
    out = list(calls)
    for d in deltas:
        if d.id is not None:
            out.append(ToolCall(d.id, d.name or "", d.arguments))
        else:
            last = out[d.index]
            out[d.index] = ToolCall(last.id, last.name, last.arguments + d.arguments)
    return out


_WS = " \t\n\r"


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class _MalformedError(Exception):
    """The text stopped looking like a call before it was committed."""


@dataclass
class _Call:
    """One call object being read, ``{"name": ..., "arguments": {...}}``, char by char."""

    arguments_keys: tuple[str, ...]
    raw: str = ""  # every character read, for when it turns out not to be a call
    stage: str = "open"  # open, key, in_key, colon, value, comma
    key: str = ""
    key_escape: bool = False
    value_key: str = ""
    value: str = ""  # the current value's text
    depth: int = 0
    in_string: bool = False
    escape: bool = False
    name: str | None = None
    arguments: str | None = None  # the arguments' text, while and after it is read
    in_arguments: bool = False
    emitted: int = 0  # characters of the arguments already sent as fragments
    committed: bool = False
    done: bool = False
    seen: set[str] = field(default_factory=set)

    def feed(self, ch: str) -> bool:
        """Read one character; True when it was consumed, False when it is past the end
        of the object (``done``) or not part of it after the commit. Raises _MalformedError
        before the commit."""
        consumed = self._step(ch)
        if consumed:
            self.raw += ch
        return consumed

    def _step(self, ch: str) -> bool:
        if self.stage == "value":
            return self._value_char(ch)
        if self.stage == "in_key":
            if self.key_escape:
                self.key_escape = False
            elif ch == "\\":
                self.key_escape = True
            elif ch == '"':
                self._end_key()
                return True
            self.key += ch
            return True
        if ch in _WS:
            return True
        expected = {"open": "{", "key": '"}' if not self.seen else '"', "colon": ":"}
        if ch not in expected.get(self.stage, ",}"):
            if self.committed:
                self.done = True
                return False
            raise _MalformedError
        if ch == "{":
            self.stage = "key"
        elif ch == '"':
            self.stage, self.key = "in_key", ""
        elif ch == ":":
            self.stage, self.value, self.depth = "value", "", 0
            self.in_string = self.escape = False
        elif ch == ",":
            self.stage = "key"
        elif not self.committed:
            raise _MalformedError  # "}" without a name and an arguments object
        else:
            self.done = True
        return True

    def _end_key(self) -> None:
        try:
            key = json.loads('"' + self.key + '"')
        except json.JSONDecodeError:
            key = None
        known = ("name", *self.arguments_keys)
        if not self.committed and (key not in known or key in self.seen):
            raise _MalformedError
        self.value_key = key if isinstance(key, str) else ""
        self.seen.add(self.value_key)
        self.stage = "colon"

    def _value_char(self, ch: str) -> bool:
        if not self.value and ch in _WS:
            return True  # whitespace before the value
        if not self.value and not self.committed:
            if self.value_key == "name" and ch != '"':
                raise _MalformedError
            if self.value_key in self.arguments_keys:
                if ch != "{":
                    raise _MalformedError
                self.in_arguments = True
        open_value = self.depth or self.in_string or not self.value
        scalar = not open_value and self.value[0] not in '"{['
        if scalar and (ch in ",}" or ch in _WS):  # the end of a number or a literal
            self._end_value()
            return self._step(ch)
        self.value += ch
        if self.in_arguments:
            self.arguments = (self.arguments or "") + ch
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
        if self.name is not None and self.in_arguments:
            self.committed = True
        closed = self.depth == 0 and not self.in_string and self.value[0] in '"{['
        if closed and (len(self.value) > 1 or self.value[0] != '"'):
            self._end_value()
        return True

    def _end_value(self) -> None:
        if self.value_key == "name" and self.name is None:
            try:
                name = json.loads(self.value)
            except json.JSONDecodeError:
                name = None
            if not isinstance(name, str) and not self.committed:
                raise _MalformedError
            self.name = name if isinstance(name, str) else ""
            if self.arguments is not None:
                self.committed = True
        self.in_arguments = False
        self.stage = "comma"

    def pending(self) -> str:
        """Arguments text read since the last call, once committed."""
        if not self.committed or self.arguments is None:
            return ""
        text = self.arguments[self.emitted :]
        self.emitted = len(self.arguments)
        return text


class ToolCallParser:
    """Streams an answer's text into content and tool-call events for one ``ToolFormat``.

    ``feed`` returns (content, events) safe to emit now; ``finish`` flushes at the end.
    ``max_calls`` keeps only the first calls (``parallel_tool_calls: false``): later ones are
    read and dropped. ``forced``: the answer is calls only (a required or named
    ``tool_choice``, whose grammar allows nothing else), so no content is returned: what is
    not a call (a call cut off before its name and arguments began) is dropped, never shown
    as the call syntax's text. ``calls`` holds the full calls made so far."""

    def __init__(self, fmt: ToolFormat, max_calls: int | None = None, forced: bool = False) -> None:
        self.fmt = fmt
        self.max_calls = max_calls
        self.forced = forced
        self.calls: list[ToolCall] = []
        self._count = 0  # calls read, kept or not
        self._buf = ""
        self._call: _Call | None = None
        # llama3_json: calls only at the very start; "start", "calls", "between", "content".
        self._state = "start" if fmt == "llama3_json" else "content"
        self._after_call = False  # hermes: the closing tag (and whitespace) may follow
        self._gap = ""  # hermes: the whitespace read after a call
        self._wrote = False  # some content was returned

    @property
    def _args_keys(self) -> tuple[str, ...]:
        if self.fmt == "hermes":
            return ("arguments", "parameters")
        return ("parameters", "arguments")

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content: list[str] = []
        events: list[ToolCallDelta] = []
        self._run(content, events, final=False)
        return self._content(content), self._keep(events)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        events: list[ToolCallDelta] = []
        self._run(content, events, final=True)
        call = self._call
        if call is not None:
            if call.committed:
                self._fragment(call, events)
            else:
                content.append(self._opener() + call.raw)
            self._call = None
        held, self._buf = self._buf, ""
        if self._state == "start" or not (self._after_call or self._count):
            content.append(held)
        elif not self._after_call:
            content.append(held.rstrip(_WS))
        return self._content(content), self._keep(events)

    def _content(self, parts: list[str]) -> str:
        text = "" if self.forced else "".join(parts)
        self._wrote = self._wrote or bool(text)
        return text

    def _skip_space(self) -> None:
        rest = self._buf.lstrip(_WS)
        self._gap += self._buf[: len(self._buf) - len(rest)]
        self._buf = rest

    def _opener(self) -> str:
        return HERMES_OPEN if self.fmt == "hermes" else ""

    def _keep(self, events: list[ToolCallDelta]) -> list[ToolCallDelta]:
        kept = [e for e in events if self.max_calls is None or e.index < self.max_calls]
        self.calls = merge_calls(self.calls, kept)
        return kept

    def _start_call(self) -> None:
        self._call = _Call(self._args_keys)

    def _fragment(self, call: _Call, events: list[ToolCallDelta]) -> None:
        text = call.pending()
        if not text:
            return
        index = self._count
        if events and events[-1].index == index and events[-1].id is None:
            events[-1].arguments += text
        else:
            events.append(ToolCallDelta(index, arguments=text))

    def _read_call(self, content: list[str], events: list[ToolCallDelta]) -> bool:
        """Feed the buffer to the open call; True when it ended (done or malformed)."""
        call = self._call
        assert call is not None
        buf, i = self._buf, 0
        try:
            while i < len(buf) and not call.done:
                was_committed = call.committed
                if not call.feed(buf[i]):
                    break
                i += 1
                if call.committed and not was_committed:
                    events.append(ToolCallDelta(self._count, new_call_id(), call.name, ""))
        except _MalformedError:
            # Not a call: what was read is content, from the opening on; the character
            # that ended it is read again as content.
            content.append(self._opener() + call.raw)
            self._buf = buf[i:]
            self._call = None
            return True
        self._buf = buf[i:]
        self._fragment(call, events)
        if call.done:
            self._call = None
            self._count += 1
            return True
        return False

    def _run(self, content: list[str], events: list[ToolCallDelta], final: bool) -> None:
        if self.fmt == "hermes":
            self._run_hermes(content, events, final)
        else:
            self._run_llama(content, events, final)

    def _run_hermes(self, content: list[str], events: list[ToolCallDelta], final: bool) -> None:
        while True:
            if self._call is not None:
                count = self._count
                if not self._read_call(content, events):
                    return
                self._after_call = self._count > count
                continue
            if self._after_call:
                self._skip_space()
                if self._buf.startswith(HERMES_CLOSE):
                    self._buf = self._buf[len(HERMES_CLOSE) :]
                    self._skip_space()
                elif not final and HERMES_CLOSE.startswith(self._buf):
                    return  # empty, or a part of the closing tag
                if not self._buf or (not final and HERMES_OPEN.startswith(self._buf)):
                    return  # nothing yet, or perhaps another call's opening
                self._after_call = False
                if not self._buf.startswith(HERMES_OPEN) and (self._wrote or any(content)):
                    # Text resumes after a call, with text before it: keep the two apart,
                    # as the model did (or with a line break where it wrote nothing).
                    content.append(self._gap or "\n")
                self._gap = ""
            at = self._buf.find(HERMES_OPEN)
            if at >= 0:
                content.append(self._buf[:at].rstrip(_WS))
                self._buf = self._buf[at + len(HERMES_OPEN) :]
                self._start_call()
                continue
            if final:
                return
            # Hold back what may become the opening tag, and whitespace before it.
            keep = _held_prefix_len(self._buf, HERMES_OPEN)
            body = self._buf[: len(self._buf) - keep]
            safe = body.rstrip(_WS)
            content.append(safe)
            self._buf = self._buf[len(safe) :]
            return

    def _run_llama(self, content: list[str], events: list[ToolCallDelta], final: bool) -> None:
        while True:
            if self._state == "content":
                content.append(self._buf)
                self._buf = ""
                return
            if self._call is not None:
                count = self._count
                if not self._read_call(content, events):
                    return
                # A malformed call makes the rest of the answer content.
                self._state = "between" if self._count > count else "content"
                continue
            stripped = self._buf.lstrip(_WS)
            if self._state == "start":
                if stripped.startswith(PYTHON_TAG):
                    stripped = stripped[len(PYTHON_TAG) :].lstrip(_WS)
                elif stripped and PYTHON_TAG.startswith(stripped) and not final:
                    return
                if not stripped:
                    return
                if stripped[0] != "{":
                    self._state = "content"
                    continue
                self._buf = stripped
                self._state = "calls"
                self._start_call()
                continue
            # between calls: "; " then the next one, or the rest is content
            if not stripped:
                self._buf = ""
                return
            if stripped[0] == ";":
                self._buf = stripped[1:]
                self._state = "start"
                continue
            self._buf = stripped
            self._state = "content"


def parse_tool_calls(
    text: str, fmt: ToolFormat, max_calls: int | None = None
) -> tuple[str, list[ToolCall]]:
    """The content and the calls of a whole answer: the streaming parser fed in one piece."""
    parser = ToolCallParser(fmt, max_calls)
    content, _ = parser.feed(text)
    tail, _ = parser.finish()
    return content + tail, parser.calls
