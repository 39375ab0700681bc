"""The Python heap of a server: full garbage collections kept off the request path.

A loaded model leaves ~400,000 objects the collector tracks (torch modules, the tokenizer,
the template environment). A full collection walks them all, holding the GIL: 0.5-0.8 s
on a 2-core machine, during which /health and every stream wait. Two measures, measured
with ``perf/health_hostile_bodies.py``:

- :func:`settle` after loading moves what loading left into the permanent generation, so
  later collections walk only what requests made since (a full one over 150,000 decoded
  tools fell from 780 to ~110 ms);
- :func:`gc_paused` holds collections off while a request body is decoded or built, whose
  hundreds of thousands of new containers would otherwise set off full collections. The
  pause is counted, so threads building requests at once resume collecting only when the
  last one ends; the objects a build makes are freed by reference counting, not by the
  collector, so holding it off costs no memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

_lock = threading.Lock()
_holds = 0
_resume = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    global _holds, _resume
    with _lock:
        if _holds == 0:
            _resume = gc.isenabled()
            gc.disable()
        _holds += 1
    try:
        yield
    finally:
        with _lock:
            _holds -= 1
            if _holds == 0 and _resume:
                gc.enable()


def settle() -> None:
    """Collect once, then exempt every object alive now from later collections."""
    gc.collect()
    gc.freeze()


async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker thread, with collections held off (``fermi.heap``), and
    what it built freed there too when it raises: a traceback keeps every frame's locals
    alive, and the 250,000 messages of a refused body, freed on the event loop with it,
    held /health back another 40-100 ms."""

    def call() -> Any:
        try:
            with gc_paused():
                return fn(*args)
        except BaseException as exc:
            seen, chained = set(), exc  # the exceptions it was raised from hold frames too
            while chained is not None and id(chained) not in seen:
                seen.add(id(chained))
                traceback.clear_frames(chained.__traceback__)
                chained = chained.__cause__ or chained.__context__
            raise

    return await asyncio.to_thread(call)
