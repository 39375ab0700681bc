"""Thinking switches: how a model's chat template turns its reasoning on and off.

Families say it in different ways, and ``thinking="on" | "off" | "auto"`` has to mean the
same to the user for each of them:

- a template variable: Qwen3 and SmolLM3 read ``enable_thinking``, Granite 3.3 reads
  ``thinking`` (and only writes its thinking instructions without a system message);
- SmolLM3 also reads ``/think`` and ``/no_think`` from the system message, and they win
  over ``enable_thinking`` there;
- a generation prompt that opens ``<think>`` itself (Qwen3-2507 Thinking, the first R1
  distills): the output starts inside the reasoning;
- a model that writes ``<think>`` on its own with no switch at all (DeepSeek-R1-0528's
  Qwen3 distill: its template only drops past reasoning);
- no thinking at all (Qwen3-2507 Instruct, Gemma 3, Llama 3.2, Phi-4-mini).

``ThinkingConvention.of`` reads which of these a tokenizer's template follows;
``ThinkingConvention.prompt`` renders a conversation for a thinking mode and says where
the output starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fermi.errors import RequestError
from fermi.text.tokenizer import Tokenizer, template_variables

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# The empty block Qwen3's template writes when thinking is off: the same closes the block
# of a model that opens it on its own.
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
# Template variables that switch thinking, in the order they are looked for.
SWITCHES = ("enable_thinking", "thinking")
# SmolLM3's system-prompt flags (its template reads /no_think first).
SYSTEM_FLAGS = ("/no_think", "/think")
# Granite 3.3 asked to think writes <think>...</think><response>...</response>.
RESPONSE_TAGS = ("<response>", "</response>")

Thinking = Literal["on", "off", "auto"]
Render = Callable[[Sequence[Mapping[str, Any]], dict[str, Any]], str]


@dataclass(frozen=True)
class ThinkingPrompt:
    """A rendered chat prompt and where the model's output starts."""

    text: str
    # The prompt ends inside an open <think> block: the output starts in the reasoning.
    start_in_reasoning: bool
    # The model may open a <think> block itself at the very start of its output.
    may_open: bool


@dataclass(frozen=True)
class ThinkingConvention:
    """How one chat template switches thinking (see the module docstring)."""

    switch: str | None = None  # the template variable that turns thinking on and off
    system_flags: bool = False  # /think and /no_think in the system message (SmolLM3)
    opens: bool = False  # the generation prompt opens <think> itself
    unprompted: bool = False  # the model writes <think> itself; the template has no switch
    # The answer after the reasoning comes wrapped in these tags (Granite 3.3).
    answer_tags: tuple[str, str] | None = None

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ThinkingConvention:
        template = tokenizer.chat_template
        if not template:
            return cls()
        variables = template_variables(template) or set()
        switch = next((name for name in SWITCHES if name in variables), None)
        return cls(
            switch=switch,
            system_flags=all(flag in template for flag in SYSTEM_FLAGS),
            opens=_generation_prompt_opens(tokenizer),
            # A template that cuts past reasoning at </think> but never writes a think
            # block of its own belongs to a model that always opens one itself.
            unprompted=switch is None and THINK_CLOSE in template and THINK_OPEN not in template,
            answer_tags=RESPONSE_TAGS if switch == "thinking" and _names_tags(template) else None,
        )

    @property
    def can_think(self) -> bool:
        return self.switch is not None or self.opens or self.unprompted

    def prompt(
        self, render: Render, messages: Sequence[Mapping[str, Any]], thinking: Thinking, model: str
    ) -> ThinkingPrompt:
        """Render ``messages`` for ``thinking`` with ``render(messages, variables)``.

        "auto" renders as the template does by default. "on" makes the model reason before
        answering and is refused (naming ``model``) where it cannot; "off" makes it answer
        without reasoning: the switch off, or, where the template or the model opens a
        think block with no switch, that block closed at once."""
        explicit = thinking != "auto"
        if explicit and self.system_flags:
            # The explicit mode wins over the flags; the template drops them anyway.
            messages = _without_flags(messages)
        variables = {self.switch: thinking == "on"} if explicit and self.switch else {}
        text = render(messages, variables)
        end = _prompt_end(text)
        if thinking == "on" and not (end == "open" or self._turns_on(render, messages, text)):
            # (The advice is the Python API's; HTTP names its own fields, without it.)
            raise RequestError(
                self._cannot_think(model), "thinking", hint="use thinking='auto' or 'off'"
            )
        if thinking == "off":
            if end == "open":
                text = text + ("" if text.endswith("\n") else "\n") + THINK_CLOSE + "\n\n"
            elif end == "bare" and (self.unprompted or self.opens):
                text = text + EMPTY_THINK
            end = _prompt_end(text)
        may_open = end == "bare" and thinking != "off" and self.can_think
        return ThinkingPrompt(text, end == "open", may_open)

    def _turns_on(self, render: Render, messages: Sequence[Mapping[str, Any]], on: str) -> bool:
        """Whether the "on" prompt ``on`` (not opening <think>) lets the model reason."""
        if _prompt_end(on) == "closed":
            return False
        if self.unprompted:
            return True
        # The switch must change the prompt (Granite's does only without a system message).
        return self.switch is not None and render(messages, {self.switch: False}) != on

    def _cannot_think(self, model: str) -> str:
        if self.switch is not None:
            return (
                f"thinking='on' changes nothing in this conversation's prompt: {model}'s chat "
                f"template reads `{self.switch}` only in some conversations (Granite 3.3's "
                "only without a system message)"
            )
        return (
            f"{model} cannot think: its chat template has no thinking switch and never opens "
            "a <think> block"
        )


def _prompt_end(text: str) -> Literal["open", "closed", "bare"]:
    """Whether ``text`` ends inside a think block, right after one, or with neither."""
    tail = text.rstrip()
    if tail.endswith(THINK_OPEN):
        return "open"
    if tail.endswith(THINK_CLOSE):
        return "closed"
    return "bare"


def _generation_prompt_opens(tokenizer: Tokenizer) -> bool:
    """Whether the template's generation prompt opens <think> (rendered for a probe)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    except (ValueError, TypeError):  # a template that refuses the probe: judged by its text
        return False
    return _prompt_end(text) == "open"


def _names_tags(template: str) -> bool:
    return all(tag in template for tag in RESPONSE_TAGS)


def _without_flags(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``messages`` with /think and /no_think taken out of a leading system message, as
    SmolLM3's template takes them out of the instructions it writes."""
    out = list(messages)
    if out and out[0].get("role") == "system":
        content = out[0].get("content")
        if isinstance(content, str):
            out[0] = {**out[0], "content": _unflagged(content)}
        elif isinstance(content, list):
            parts = [
                {**p, "text": _unflagged(p["text"])}
                if isinstance(p, dict) and isinstance(p.get("text"), str)
                else p
                for p in content
            ]
            out[0] = {**out[0], "content": parts}
    return out


def _unflagged(text: str) -> str:
    for flag in SYSTEM_FLAGS:
        text = text.replace(flag, "")
    return text
