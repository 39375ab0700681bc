"""The runner's cache slots: which are free, which keep a finished request's cache, and
the moves that keep running requests in the lowest slots.

A slot a request ran in keeps its KV cache when the request ends (an *idle* slot): a later
prompt that starts with the same tokens (a chat UI or an agent resending its history, a
shared system prompt) is admitted there and prefills only the rest. A request naming a
session keeps its cache for that session alone until the session is released. Idle slots
never hold up work: when no slot is free, the least recently used idle slot is taken.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from fermi.runners.base import SlotMove


@dataclass
class Cached:
    """The token id at each position an idle slot's cache holds."""

    tokens: list[int]
    session: str | None = None


# Fewer shared tokens than this are prefilled again rather than copied from another slot: a
# copy is a fixed number of small device operations (two per layer).
COPY_AT_LEAST = 32


class SlotTable:
    def __init__(self, slots: int, reuse: bool, moves: bool = True) -> None:
        self.reuse = reuse  # finished requests' caches are kept for any later prompt
        self.moves = moves  # the runner can copy a slot's cache (Capabilities.moves_slots)
        self.free = list(range(slots))  # sorted: the lowest first keeps the batch dense
        self.idle: OrderedDict[int, Cached] = OrderedDict()  # least recently used first
        self.sessions: dict[str, int] = {}  # session -> its idle slot

    @property
    def available(self) -> bool:
        return bool(self.free or self.idle)

    def take(self, prompt: Sequence[int], session: str | None) -> tuple[int, int, list[SlotMove]]:
        """A slot for ``prompt``, how many of its first tokens that slot's cache holds, and
        the copies to make before the request runs there.

        The session's own slot if it kept one. Else the idle slot sharing the longest
        prefix, taken over when it holds the whole prompt, or reuses at least as many tokens
        as it throws away, or no slot is free. Else the lowest free slot, into which a
        shared prefix of at least ``COPY_AT_LEAST`` tokens is first copied from its idle
        slot (when the runner can copy slots), which keeps its cache for the conversation it
        holds. Else the least recently used idle slot (the lowest idle slot's cache moving
        there when that one is lower). The prompt's last token always runs again (its
        logits pick the first new token); cache entries past the shared prefix are masked by
        position, then overwritten.
        """
        if session is not None and session in self.sessions:
            slot = self.sessions.pop(session)
            return slot, usable(self.idle.pop(slot).tokens, prompt), []
        best, shared = None, 0
        if self.reuse:
            for slot, cached in self.idle.items():
                if cached.session is None:
                    n = usable(cached.tokens, prompt)
                    if n > shared:
                        best, shared = slot, n
        whole = shared == len(prompt) - 1  # e.g. the same prompt again (a regenerated reply)
        if best is not None and (
            whole or not self.free or 2 * shared >= len(self.idle[best].tokens)
        ):
            del self.idle[best]
            return best, shared, []
        if self.free:
            slot = self.free.pop(0)
            if best is not None and self.moves and shared >= COPY_AT_LEAST:
                self.idle.move_to_end(best)  # used: the most recently
                return slot, shared, [SlotMove(best, slot, shared)]
            return slot, 0, []
        slot, evicted = self.idle.popitem(last=False)
        if evicted.session is not None:  # that session no longer has a cache
            del self.sessions[evicted.session]
        # Every slot was taken: run in the lowest slot nothing runs in, so the step stays
        # dense, its cache moving into the slot just given up.
        lowest = min(self.idle, default=slot)
        if not self.moves or lowest >= slot:
            return slot, 0, []
        self._rename(lowest, slot)
        return lowest, 0, [SlotMove(lowest, slot, len(self.idle[slot].tokens))]

    def finish(self, slot: int, tokens: list[int], session: str | None) -> None:
        """A request in ``slot`` ended with ``tokens`` in its cache: keep them for its
        session, or for any later prompt, or free the slot."""
        if session is not None:
            older = self.sessions.pop(session, None)  # two overlapping requests of one session
            if older is not None:
                del self.idle[older]
                bisect.insort(self.free, older)
            self.sessions[session] = slot
            self.idle[slot] = Cached(tokens, session)
        elif self.reuse and tokens:
            self.idle[slot] = Cached(tokens)
        else:
            bisect.insort(self.free, slot)

    def release(self, slot: int) -> None:
        """``slot``'s cache is worthless (its request failed): free it."""
        bisect.insort(self.free, slot)

    def release_session(self, session: str) -> None:
        slot = self.sessions.pop(session, None)
        if slot is not None:
            del self.idle[slot]
            bisect.insort(self.free, slot)

    def drop_idle(self) -> None:
        """Forget every kept cache (after a failed step, whose moves may not have run)."""
        for slot in self.idle:
            bisect.insort(self.free, slot)
        self.idle.clear()
        self.sessions.clear()

    def compact(self, running: dict[int, int]) -> list[SlotMove]:
        """Moves that put the n running sequences (``running``: slot -> cached positions)
        into slots 0..n-1, and the table updated as if they ran.

        A runner's step over slots 0..B-1 costs less than one over scattered slots: a GPU
        runner's step covers the smallest batch bucket holding the highest live slot, and
        the eager runner reads slots 0..B-1 as a view but gathers scattered ones. Each
        running sequence at slot n or above moves into a hole below n, free holes first. An
        idle cache in the hole moves once, to a free slot at n or above; with none free it
        stays, and so does the sequence.
        Each move copies the sequence's cached positions (about 0.1 MB per position for
        Qwen3-1.7B in bf16) and its sampling row.
        """
        n = len(running)
        holes = [h for h in range(n) if h not in running]
        if not holes:
            return []

        holes.sort(key=lambda h: h in self.idle)  # free holes first
        movers = sorted(s for s in running if s >= n)
        moves = []
        for src, hole in zip(movers, holes, strict=True):
            cached = self.idle.get(hole)
            if cached is not None:
                spare = next((f for f in self.free if f >= n), None)
                if spare is None:  # a kept cache is never dropped for speed
                    break
                moves.append(SlotMove(hole, spare, len(cached.tokens)))
                self.free.remove(spare)
                self._rename(hole, spare)
            else:
                self.free.remove(hole)
            moves.append(SlotMove(src, hole, running[src]))
            bisect.insort(self.free, src)
        return moves

    def _rename(self, old: int, new: int) -> None:
        """An idle cache moved from ``old`` to ``new``, keeping its place in the LRU order."""
        entries = [(new if s == old else s, c) for s, c in self.idle.items()]
        self.idle = OrderedDict(entries)
        cached = self.idle[new]
        if cached.session is not None:
            self.sessions[cached.session] = new


def usable(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """Prompt tokens a slot holding ``cached`` can skip: their common prefix, short of the
    prompt's last token."""
    return min(common_prefix(cached, prompt), len(prompt) - 1)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix, compared a block at a time (a slice
    comparison runs in C, a Python loop per token would not)."""
    n = min(len(a), len(b))
    a, b = list(a[:n]), list(b[:n])
    i, block = 0, 256
    while i < n and a[i : i + block] == b[i : i + block]:
        i += block
    if i >= n:
        return n
    end = min(i + block, n)
    while i < end and a[i] == b[i]:
        i += 1
    return i
