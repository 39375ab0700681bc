"""Stop strings over streamed text: emit only text that can no longer be part of a stop."""

from __future__ import annotations


class StopStringMatcher:
    """Finds stop strings in streamed text, even when split across chunks.

    A suffix that could still grow into a stop string is held back, so no part of a stop
    string is ever emitted. When several stop strings match, the one that completes first
    wins (ties go to the one starting earlier): that is what token-by-token generation
    would have hit, so the result does not depend on how the text was chunked.
    """

    def __init__(self, stops: list[str]) -> None:
        # Deduplicated and without "", which would otherwise match everywhere.
        self.stops: list[str] = sorted({s for s in stops if s}, key=len, reverse=True)
        self._longest = len(self.stops[0]) if self.stops else 0
        self._buf = ""
        self.stopped = False
        self.matched: str | None = None  # which stop string ended the stream, if any

    def _held_len(self) -> int:
        """Length of the longest suffix of the buffer that is a proper prefix of a stop."""
        buf = self._buf
        for size in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-size:]
            if any(len(stop) > size and stop.startswith(tail) for stop in self.stops):
                return size
        return 0

    def feed(self, text: str) -> tuple[str, bool]:
        """Consume a chunk; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        self._buf += text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            start = self._buf.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        if best is not None:
            _, start, stop = best
            emitted = self._buf[:start]
            self._buf = ""
            self.stopped = True
            self.matched = stop
            return emitted, True
        keep = self._held_len()
        emitted = self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep :]
        return emitted, False

    def flush(self) -> str:
        """Generation ended for another reason: the held-back text was not a stop after all."""
        held, self._buf = self._buf, ""
        return "" if self.stopped else held
