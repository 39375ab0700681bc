"""Cross-origin requests from browsers (``fermi serve --cors-origins``).

A page on another origin may call the API only when the server says so: a preflight
``OPTIONS`` (sent before any request with a JSON body or an Authorization header) must be
answered, without authentication, with the origin, methods and headers allowed, and every
reply must then carry ``Access-Control-Allow-Origin``. With no origins configured the
server sends no CORS headers at all, so browsers refuse cross-origin calls.
"""

from __future__ import annotations

METHODS = "GET, POST, HEAD, OPTIONS"
# Request headers a page may send (what the OpenAI and Anthropic SDKs and browser UIs
# send); a preflight asking for any other header is answered without it, and the browser
# refuses that request.
ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "x-api-key",
        "x-request-id",
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
        "openai-organization",
        "openai-project",
        "openai-beta",
    }
)
# The OpenAI SDKs send x-stainless-* headers (retry count, OS, runtime...): allowed by prefix.
ALLOWED_PREFIXES = ("x-stainless-",)
# Response headers a page's script may read beyond the simple ones.
EXPOSED = "x-request-id, retry-after"
MAX_AGE_S = "600"


class CorsPolicy:
    """Which origins may call the server, and the headers that say so."""

    def __init__(self, origins: list[str] | tuple[str, ...] = ()) -> None:
        cleaned = [o.strip().rstrip("/") for o in origins if o.strip()]
        self.any = "*" in cleaned
        self.origins = frozenset(o for o in cleaned if o != "*")

    @property
    def enabled(self) -> bool:
        return self.any or bool(self.origins)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any or origin in self.origins)

    def headers(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        """Headers for an actual (not preflight) reply to a request from ``origin``."""
        if not self.enabled:
            return ()
        if not self.allows(origin):
            # The answer depends on the Origin header: caches must keep them apart.
            return (("vary", "origin"),)
        return (
            ("access-control-allow-origin", "*" if self.any else origin),
            ("access-control-expose-headers", EXPOSED),
            ("vary", "origin"),
        )

    def preflight(self, origin: str | None, requested_headers: str | None) -> tuple:
        """Headers of the answer to a preflight from an allowed ``origin``."""
        asked = [h.strip().lower() for h in (requested_headers or "").split(",") if h.strip()]
        allowed = [h for h in asked if h in ALLOWED_HEADERS or h.startswith(ALLOWED_PREFIXES)]
        return (
            ("access-control-allow-origin", "*" if self.any else origin),
            ("access-control-allow-methods", METHODS),
            ("access-control-allow-headers", ", ".join(allowed or sorted(ALLOWED_HEADERS))),
            ("access-control-max-age", MAX_AGE_S),
            ("vary", "origin, access-control-request-method, access-control-request-headers"),
        )
