"""Server-side conversations for the Chat RPC.

A session holds its messages; the engine holds its KV cache under the session id (see
``GenerationRequest.session``), so a turn prefills only the tokens its newly rendered
prompt does not share with what the cache already holds. The engine may drop an idle
session's cache when it needs the slot; the conversation survives and its next turn is a
full prefill. What ends a session is this store: ``CloseSession``, the idle TTL
(``FERMI_SESSION_TTL_MS``) or LRU eviction beyond ``FERMI_SESSION_MAX``; after that its
id is ``NOT_FOUND``, never a silent new conversation. Closing a session mid-turn cancels
the turn (TTL and eviction only end idle sessions).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from fermi.errors import FermiError, clipped

DEFAULT_SESSION_MAX = 1024
# Ids of sessions that ended, remembered so NOT_FOUND can say why (bounded).
_REMEMBER_ENDED = 4096


class SessionNotFoundError(FermiError):
    """The session id is unknown, expired, evicted or closed."""


class SessionBusyError(FermiError):
    """The session already has a turn in progress."""


class SessionLimitError(FermiError):
    """Every session slot is taken by a session that is mid-turn."""


@dataclass
class Session:
    id: str
    messages: list[dict] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False
    closed: bool = False
    cancel_turn: Callable[[], None] | None = None  # stops the running turn's generation
    # A new session is settled when its first turn answers (the client learns its id): only
    # then does it make room by evicting another, so a first turn that fails costs no one.
    settled: bool = True


@dataclass(frozen=True)
class SessionConfig:
    ttl_ms: int = 0  # idle time after which a session ends; 0 = never
    max_sessions: int = DEFAULT_SESSION_MAX  # beyond it the least recently used one ends

    @classmethod
    def from_env(cls, ttl_ms: int | None = None, max_sessions: int | None = None):
        """Flags win over ``FERMI_SESSION_TTL_MS`` / ``FERMI_SESSION_MAX``."""
        if ttl_ms is None:
            ttl_ms = _env_int("FERMI_SESSION_TTL_MS", 0)
        if max_sessions is None:
            max_sessions = _env_int("FERMI_SESSION_MAX", DEFAULT_SESSION_MAX)
        if ttl_ms < 0:
            raise ValueError(f"the session TTL must be >= 0 ms, not {ttl_ms}")
        if max_sessions < 1:
            raise ValueError(f"the session limit must be >= 1, not {max_sessions}")
        return cls(ttl_ms, max_sessions)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from None


class SessionStore:
    """Sessions by id in least-recently-used order. Thread-safe.

    ``release(id)`` is called whenever a session ends, to drop its KV cache.
    """

    def __init__(
        self,
        config: SessionConfig,
        release: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._release = release
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why it ended
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def begin_new(self, messages: list[dict]) -> Session:
        """Start a session holding ``messages`` (e.g. a system prompt) with a turn running.
        At the limit it needs an idle session to evict, but evicts it only when settled
        (:meth:`settle`): a first turn that fails, or is cancelled, before it answers ends no
        other session."""
        with self._lock:
            self._expire_locked()
            limit = self.config.max_sessions
            if len(self._sessions) >= limit and all(s.busy for s in self._sessions.values()):
                raise SessionLimitError(f"all {limit} sessions are mid-turn; try again later")
            session = Session(
                uuid.uuid4().hex, list(messages), self._clock(), busy=True, settled=False
            )
            self._sessions[session.id] = session
            return session

    def settle(self, session: Session) -> None:
        """A new session's first turn answered: keep it, and end the least recently used
        idle sessions beyond the limit."""
        with self._lock:
            if session.settled or session.closed:
                return
            session.settled = True
            self._trim_locked()

    def _trim_locked(self) -> None:
        limit = self.config.max_sessions
        while len(self._sessions) > limit:
            idle = next((s for s in self._sessions.values() if not s.busy), None)
            if idle is None:  # every one mid-turn: trimmed when one of them ends
                return
            self._end_locked(idle, f"was evicted (more than {limit} sessions)")

    def begin_turn(self, session_id: str) -> Session:
        """The session for a new turn, marked busy; raises if unknown or already busy."""
        with self._lock:
            self._expire_locked()
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionNotFoundError(self._not_found(session_id))
            if session.busy:
                raise SessionBusyError(f"session {session_id} already has a turn in progress")
            session.busy = True
            self._sessions.move_to_end(session_id)
            return session

    def generating(self, session: Session, cancel: Callable[[], None]) -> None:
        """The turn's generation started; ``cancel()`` stops it if the session ends first
        (at once, if it already has)."""
        with self._lock:
            if not session.closed:
                session.cancel_turn = cancel
                return
        cancel()

    def end_turn(self, session: Session, added: list[dict] | None) -> None:
        """Finish a turn; ``added`` (the user and assistant messages) is appended when the
        turn completed, and dropped when it was cancelled or failed."""
        with self._lock:
            session.busy = False
            session.cancel_turn = None
            session.last_used = self._clock()
            if added and not session.closed:
                session.messages.extend(added)
            if session.settled and not session.closed:
                self._sessions.move_to_end(session.id)  # (recently used: at its turn's end too)
                self._trim_locked()  # (a settle that found every session mid-turn)
        if session.closed:
            # It ended while the turn ran: the engine may have kept the cache after that.
            self._release(session.id)

    def close(self, session_id: str) -> None:
        with self._lock:
            self._expire_locked()
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionNotFoundError(self._not_found(session_id))
            self._end_locked(session, "was closed")

    def discard(self, session_id: str) -> None:
        """End a session if it still exists (no error when it does not)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._end_locked(session, "was discarded")

    def expire(self) -> None:
        """End sessions idle for longer than the TTL (also done on every other call)."""
        with self._lock:
            self._expire_locked()

    def _expire_locked(self) -> None:
        ttl = self.config.ttl_ms
        if ttl <= 0:
            return
        deadline = self._clock() - ttl / 1000.0
        for session in list(self._sessions.values()):
            if not session.busy and session.last_used < deadline:
                self._end_locked(session, f"expired after {ttl} ms idle")

    def _end_locked(self, session: Session, why: str) -> None:
        session.closed = True
        if session.cancel_turn is not None:
            session.cancel_turn()
        del self._sessions[session.id]
        self._ended[session.id] = why
        while len(self._ended) > _REMEMBER_ENDED:
            self._ended.popitem(last=False)
        self._release(session.id)

    def _not_found(self, session_id: str) -> str:
        if not session_id:
            return "session_id is empty"
        why = self._ended.get(session_id)
        if why is None:
            return f"session {clipped(session_id)} does not exist"
        return f"session {session_id} {why}"
