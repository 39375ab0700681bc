"""The OpenAI-compatible HTTP server (Granian + msgspec)."""
