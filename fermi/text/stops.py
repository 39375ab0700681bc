"""Stop strings over streamed text: emit only text that can no longer be part of a stop.

All of a request's stop strings go into one Aho-Corasick automaton (``StopStrings``),
built once when the request is built and shared by its choices. Matching (one
``StopStringMatcher`` per sequence, on the engine thread) walks it a character at a time:
a character costs one transition plus, amortised, at most one failure link, however many
stop strings there are (scanning the text once per stop string let one request with 600k
of them slow a concurrent request 16-fold). Own code rather than ``pyahocorasick``: the
hold-back needs the depth of the current state, which that library does not expose, and
the bounds on stop strings keep the automaton small (at most 4,097 states, built in
~15 ms).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

# Bounds on a request's stop strings (OpenAI allows 4 of any length): the automaton's size
# and the text held back while it may start a stop string stay small.
MAX_STOPS = 16
MAX_STOP_CHARS = 256


class StopStrings:
    """The automaton of a set of stop strings; never changed once built.

    A state is a trie node: the longest suffix of the text so far that is a prefix of some
    stop string. ``depth[state]`` is its length, which is exactly the text to hold back;
    ``ends[state]`` is the index of the longest stop string that ends there (-1: none),
    the one starting earliest among those completing at this character.
    """

    __slots__ = ("depth", "ends", "fail", "given", "goto", "strings")

    def __init__(self, stops: Iterable[str]) -> None:
        self.given = tuple(stops)
        # Deduplicated and without "", which would otherwise match everywhere.
        self.strings: tuple[str, ...] = tuple(dict.fromkeys(s for s in self.given if s))
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.ends = [-1]
        for index, stop in enumerate(self.strings):
            state = 0
            for char in stop:
                child = self.goto[state].get(char)
                if child is None:
                    child = len(self.goto)
                    self.goto[state][char] = child
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.ends.append(-1)
                state = child
            self.ends[state] = index
        self.fail = [0] * len(self.goto)
        # Breadth first: a state's failure link is shallower, so already final.
        queue = deque(self.goto[0].values())
        while queue:
            state = queue.popleft()
            for char, child in self.goto[state].items():
                link = self.fail[state]
                while link and char not in self.goto[link]:
                    link = self.fail[link]
                target = self.goto[link].get(char, 0)
                self.fail[child] = target
                if self.ends[child] < 0:
                    self.ends[child] = self.ends[target]
                queue.append(child)


class StopStringMatcher:
    """Finds stop strings in streamed text, even when split across chunks.

    A suffix that could still grow into a stop string is held back, so no part of a stop
    string is ever emitted. When several stop strings match, the one that completes first
    wins (ties go to the one starting earlier): that is what token-by-token generation
    would have hit, so the result does not depend on how the text was chunked.
    """

    def __init__(self, stops: StopStrings | Iterable[str]) -> None:
        self.automaton = stops if isinstance(stops, StopStrings) else StopStrings(stops)
        self._state = 0
        self._held = ""  # the last depth[state] characters, not emitted yet
        self.stopped = False
        self.matched: str | None = None  # which stop string ended the stream, if any

    def feed(self, text: str) -> tuple[str, bool]:
        """Consume a chunk; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        automaton = self.automaton
        if not automaton.strings:
            return text, False
        goto, fail, ends = automaton.goto, automaton.fail, automaton.ends
        state = self._state
        for i, char in enumerate(text):
            while True:
                child = goto[state].get(char)
                if child is not None or not state:
                    state = child or 0
                    break
                state = fail[state]
            if ends[state] >= 0:
                stop = automaton.strings[ends[state]]
                seen = self._held + text[: i + 1]
                self._held, self.stopped, self.matched = "", True, stop
                return seen[: len(seen) - len(stop)], True
        self._state = state
        seen = self._held + text
        keep = len(seen) - automaton.depth[state]
        self._held = seen[keep:]
        return seen[:keep], False

    def flush(self) -> str:
        """Generation ended for another reason: the held-back text was not a stop after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
