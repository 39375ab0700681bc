"""What a server worker needs to build its app, handed from ``fermi serve`` via the env.

Granian starts the app in a fresh worker process and imports it by name, so the
settings travel as one JSON environment variable rather than as Python objects.
"""

from __future__ import annotations

import os

import msgspec

ENV_VAR = "FERMI_SERVER_CONFIG"


class ServerConfig(msgspec.Struct, kw_only=True):
    model: str
    devices: list[str | None] = msgspec.field(default_factory=lambda: [None])
    dtype: str | None = None
    max_seq_len: int | None = None
    max_batch: int | None = None
    runner: str | None = None
    quantize: str | None = None  # "int8" or "int4": weight-only quantization
    served_model_name: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 30.0  # from the end of the headers to the end of the body: 408
    max_waiting: int | None = None  # queued requests per replica before 429
    prefix_reuse: bool = True  # keep finished requests' caches for later prompts
    cors_origins: list[str] = msgspec.field(default_factory=list)  # "*" allows any

    def to_env(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_env(cls) -> ServerConfig:
        text = os.environ.get(ENV_VAR)
        if not text:
            raise RuntimeError(
                f"{ENV_VAR} is not set: start the server with `fermi serve`, or set it to "
                'a JSON object such as {"model": "Qwen/Qwen3-1.7B"}'
            )
        return msgspec.json.decode(text, type=cls)
