"""How deep the lists and objects of a request's JSON (messages, tools) may nest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fermi.errors import RequestError

# How deep lists and objects may nest in messages and tools: far beyond any real tool
# schema or message (OpenAI's structured outputs allow 10 levels of objects), far below
# Python's recursion limit, which the walks over them (and the template's tojson) meet.
MAX_NESTING = 100


def check_nesting(value: Any, field: str, limit: int = MAX_NESTING) -> None:
    """Refuse ``value`` when its lists and mappings nest more than ``limit`` deep (walked
    without recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= limit:
            raise RequestError(f"{field} nest lists or objects more than {limit} deep", field)
        stack.extend((child, depth + 1) for child in children)
