"""Tokenizer wrapper: encode/decode through `tokenizers` and chat-template rendering via jinja2."""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fermi.errors import ModelLoadError, RequestError
from fermi.jsonfile import read_json_object
from fermi.text.control import ControlText
from fermi.text.token_bytes import TokenBytes

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"
# Texts longer than this are tokenised without holding the GIL (see ``Tokenizer.encode``).
_LONG_TEXT = 65_536


class ChatTemplateError(RequestError):
    """The chat template is missing, invalid, or rejected the conversation.

    A RequestError (and so a ValueError) because it almost always comes from what the
    client sent, e.g. a template's raise_exception("roles must alternate"); API layers map
    it to HTTP 400 without knowing about jinja2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` blocks and renders their body as-is.

    Some templates mark assistant spans this way for training masks; without this
    extension they fail to compile, so we accept the tag and ignore its meaning.
    """

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's built-in tojson HTML-escapes `<`, `>`, `&` and `'`, which would corrupt
    # prompts; templates written for transformers expect plain json.dumps output.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


# A chat template is a program from the model folder: these bound what one render may do,
# so a runaway or hostile template is a ChatTemplateError instead of gigabytes allocated or
# a loop without end. Real templates write a few KB and loop over the messages.
MAX_TEMPLATE_OUTPUT = 32 * 1024 * 1024  # characters of prompt text (the body limit is 8 MB)
MAX_TEMPLATE_RANGE = 100_000  # items of every range() in one render, summed
_MAX_POWER_BITS = 4096  # an integer ** result larger than this is refused before computing


def _too_big(what: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(f"{what} (the sandbox bounds chat templates)")


def _check_size(value: Any) -> None:
    """Refuse an integer argument past the output bound: a width, count or padding that
    large (``'a'.ljust(10**10)``, ``x|center(10**10)``) would build a string that large."""
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TEMPLATE_OUTPUT:
        raise _too_big(f"the number {value} is larger than {MAX_TEMPLATE_OUTPUT}")


def _bounded_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            _check_size(value)
        return function(*args, **kwargs)

    return bounded


class _RenderBudget:
    """What one render may still spend on ``range()`` (a render's own ``range``)."""

    def __init__(self) -> None:
        self.left = MAX_TEMPLATE_RANGE

    def range(self, *args: int) -> range:
        items = range(*args)
        self.left -= len(items)
        if self.left < 0:
            raise _too_big(f"range() over more than {MAX_TEMPLATE_RANGE} items in one render")
        return items


class _TemplateSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with sizes bounded: ``*`` and ``**`` are checked before
    they compute, every call and filter refuses a size argument past the output bound."""

    # Intercepted operators are also never folded at compile time.
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, (str, list, tuple)) and isinstance(times, int)
                if sized and len(seq) * times > MAX_TEMPLATE_OUTPUT:
                    raise _too_big(
                        f"a sequence of {len(seq)} repeated {times} times is larger "
                        f"than {MAX_TEMPLATE_OUTPUT}"
                    )
            return operator.mul(left, right)
        integers = isinstance(left, int) and isinstance(right, int) and right > 0
        if integers and abs(left).bit_length() * right > _MAX_POWER_BITS:
            raise _too_big(f"{left} ** {right} is larger than {_MAX_POWER_BITS} bits")
        return operator.pow(left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        for value in (*args, *kwargs.values()):
            _check_size(value)
        return super().call(__context, __obj, *args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def template_environment() -> _TemplateSandbox:
    """The bounded sandbox chat templates are compiled and rendered in."""
    # Same whitespace settings and helpers that transformers gives templates, so a model's
    # published template renders byte-identically here.
    env = _TemplateSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def template_variables(template: str) -> set[str] | None:
    """The variables a chat template reads from its context (None: it does not parse).
    Parsed by the sandbox, which never folds ``*`` or ``**`` at compile time: a plain
    environment would compute ``{{ 'a' * 10**10 }}`` while reading the template."""
    try:
        ast = template_environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return None
    return jinja2.meta.find_undeclared_variables(ast)


def _token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are either plain strings or AddedToken dicts."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_template(value: Any, source: Path | None = None) -> str | None:
    """chat_template may be a string or a list of named templates; we serve the default one.
    Anything else is a broken file (``source``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for item in value:
            if not (
                isinstance(item, dict)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise ModelLoadError(
                    f"{source or 'the tokenizer config'}: each entry of the chat_template list "
                    f"must be an object with a string name and template, not {str(item)[:80]}"
                )
            named[item["name"]] = item["template"]
        return named.get("default")  # (named templates only, none the default: no template)
    raise ModelLoadError(
        f"{source or 'the tokenizer config'}: chat_template must be a string or a list of "
        f"named templates, not {type(value).__name__}"
    )


# Names clients use for an assistant message's reasoning; templates read reasoning_content.
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy messages into the shape templates expect, leaving the caller's dicts untouched.

    Keys set to None are dropped (templates would render the literal "None"), except
    `content`, which becomes "": OpenAI clients send `content: null` next to tool calls, and
    some templates (Qwen3's, Granite's) read a message's content unguarded. Reasoning sent
    under another name is also exposed as reasoning_content. Content given as a list of
    text parts is joined. A tool call's `function.arguments` (OpenAI's JSON string) becomes
    the object it encodes, as transformers' templates expect (they write it with `tojson`).
    """
    normalized = []
    for message in messages:
        clean = {key: value for key, value in message.items() if value is not None}
        clean.setdefault("content", "")
        reasoning = next((clean[key] for key in _REASONING_KEYS if key in clean), None)
        if reasoning is not None:
            clean.setdefault("reasoning_content", reasoning)
        content = clean.get("content")
        if isinstance(content, list):
            clean["content"] = "".join(
                part.get("text") or "" for part in content if isinstance(part, dict)
            )
        calls = clean.get("tool_calls")
        if isinstance(calls, list):
            clean["tool_calls"] = [_template_call(call) for call in calls]
        normalized.append(clean)
    return normalized


class _CallArguments(dict):
    """A tool call's arguments as the object the client's JSON text encodes, which is what
    templates that write them with ``tojson`` expect. Templates that concatenate them as
    text instead (DeepSeek's ``... + tool['function']['arguments'] + ...``) get the client's
    text back, as they would have from transformers given the string."""

    def __init__(self, parsed: dict, text: str) -> None:
        super().__init__(parsed)
        self.text = text

    def __add__(self, other: Any) -> Any:
        return self.text + other if isinstance(other, str) else NotImplemented

    def __radd__(self, other: Any) -> Any:
        return other + self.text if isinstance(other, str) else NotImplemented


def _template_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    text = function["arguments"]
    try:
        arguments = json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # (rendered as the text it is)
        return call
    if isinstance(arguments, dict):
        arguments = _CallArguments(arguments, text)
    return {**call, "function": {**function, "arguments": arguments}}


def _render_bounded(template: jinja2.Template, context: dict[str, Any]) -> str:
    """The template's output, refused once it passes MAX_TEMPLATE_OUTPUT characters."""
    pieces, size = [], 0
    for piece in template.generate(**context):
        size += len(piece)
        if size > MAX_TEMPLATE_OUTPUT:
            raise _too_big(f"the rendered prompt is longer than {MAX_TEMPLATE_OUTPUT} characters")
        pieces.append(piece)
    return "".join(pieces)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token and chat-template metadata around it."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool = False,
    ) -> None:
        self._tok = tok
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self._compiled: jinja2.Template | None = None
        added = tok.get_added_tokens_decoder()
        self.special_ids: set[int] = {i for i, t in added.items() if t.special}
        self.eos_token_id: int | None = self.token_to_id(eos_token) if eos_token else None
        self.bos_token_id: int | None = self.token_to_id(bos_token) if bos_token else None

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """Load a Hugging Face style tokenizer folder (tokenizer.json + optional config)."""
        folder = Path(folder)
        tok_path = folder / TOKENIZER_FILE
        if tok_path.is_dir():
            raise ModelLoadError(f"{tok_path} is a folder, not a tokenizer file")
        if not tok_path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in tokenizer folder {folder}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # (the Rust side raises a bare Exception)
            raise ModelLoadError(f"{tok_path} is not a tokenizer file: {exc}") from None
        # A tokenizer.json may ask its encoder to cut or pad every text (truncation, padding):
        # a prompt is the caller's text, whole, and the engine pads nothing. Off before any
        # encode: a huge fixed padding allocates gigabytes.
        tok.no_truncation()
        tok.no_padding()
        try:  # a file that parses can still fail on every text (a normalizer that panics)
            tok.encode("Hello, world! 123")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # (a Rust panic is a BaseException, not an Exception)
            raise ModelLoadError(f"{tok_path} cannot encode text: {exc!r}") from None

        config: dict[str, Any] = {}
        config_path = folder / CONFIG_FILE
        if config_path.is_file():
            config = read_json_object(config_path)

        template = _pick_template(config.get("chat_template"), config_path)
        # A standalone template file is the newer convention and wins over the config
        # entry, matching what transformers does when both exist.
        template_json = folder / TEMPLATE_JSON_FILE
        if template_json.is_file():
            loaded = read_json_object(template_json)
            template = _pick_template(loaded.get("chat_template"), template_json) or template
        template_file = folder / TEMPLATE_FILE
        if template_file.is_file():
            try:
                template = template_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ModelLoadError(f"{template_file} is not UTF-8 text: {exc}") from None

        return cls(
            tok,
            chat_template=template,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            add_bos=bool(config.get("add_bos_token", False)),
        )

    def largest_id(self) -> tuple[int, str]:
        """The largest id the tokenizer can produce, and its token."""
        token, largest = max(
            self._tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1]
        )
        return largest, token

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for callers that need its full API."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @functools.cached_property
    def token_bytes(self) -> TokenBytes:
        """``token_bytes(token_id)``: the token's own bytes, which may be part of a
        character (see ``fermi.text.token_bytes``)."""
        return TokenBytes(self._tok)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of one vocabulary entry, special tokens included."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    @functools.cached_property
    def control(self) -> ControlText:
        """Keeps a caller's text that spells an added token out of its ids (chat prompts)."""
        return ControlText(self._tok, self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) > _LONG_TEXT:
            # encode_batch lets go of the GIL while it works (encode holds it: 7 s for
            # 8 MB of text, during which no other thread, the event loop's included, ran).
            encoded = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        else:
            encoded = self._tok.encode(text, add_special_tokens=add_special_tokens)
        ids = encoded.ids
        # Tokenizers built without a post-processor (e.g. from GGUF metadata) cannot add
        # BOS themselves; add it here unless the post-processor already did.
        if (
            add_special_tokens
            and self.add_bos
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _template(self) -> jinja2.Template:
        if self._compiled is None:
            if not self.chat_template:
                raise ChatTemplateError(
                    "this tokenizer has no chat template; use a raw-text completion "
                    "or a model whose tokenizer_config.json defines chat_template"
                )
            try:
                self._compiled = template_environment().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        return self._compiled

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation to prompt text with the model's jinja chat template."""
        template = self._template()
        context: dict[str, Any] = {}
        # Undefined rather than "" when absent: templates may test `bos_token is defined`.
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        context.update(
            {
                # transformers always passes these two (None when unused); templates test
                # them with `is defined` or truthiness, so do the same for identical output.
                "tools": tools,
                "documents": None,
                **extra,
                "messages": _normalize_messages(messages),
                "add_generation_prompt": add_generation_prompt,
            }
        )
        # Only when asked: templates distinguish "undefined" from "false" (Qwen3 turns
        # thinking off only for an explicit false).
        if enable_thinking is not None:
            context["enable_thinking"] = enable_thinking
        context["range"] = _RenderBudget().range
        try:
            return _render_bounded(template, context)
        except (jinja2.TemplateError, OverflowError) as exc:
            # OverflowError: float arithmetic past its range, e.g. 10.0 ** 400.
            raise ChatTemplateError(f"chat template error: {exc}") from exc
        except RecursionError:  # a macro that calls itself without end
            raise ChatTemplateError("chat template error: it recurses too deeply") from None

    def render_prompt_ids(
        self,
        messages: list[dict[str, Any]],
        enable_thinking: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Render the conversation with a generation prompt and tokenize it.

        Special tokens are not added again: the template already wrote BOS etc. as text,
        and their text form encodes to the special ids.
        """
        text = self.apply_chat_template(messages, enable_thinking=enable_thinking, tools=tools)
        return self.encode(text, add_special_tokens=False)
