"""``POST /v1/embeddings``: a body's inputs embedded by one replica, in OpenAI's shape.

Tokenising (megabytes of text) and encoding the reply (2048 vectors of thousands of
floats) run in a worker thread, so the event loop keeps answering meanwhile; the forward
passes run on the replica's engine thread between its generation steps
(``fermi/engine/embeddings.py``).
"""

from __future__ import annotations

import asyncio
import base64

import torch

from fermi.engine.api import Engine
from fermi.errors import EngineOverloadedError, FermiError, RequestError
from fermi.server.errors import ApiError, closed, overloaded
from fermi.server.protocol import (
    ENCODER,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)


async def embeddings_reply(engine: Engine, body: EmbeddingRequest, model: str) -> tuple[bytes, int]:
    """The encoded response to ``body`` and the tokens it embedded."""
    try:
        ids = await asyncio.to_thread(engine.embedding_ids, body.input)
        future = engine.submit_embedding(ids, body.dimensions)
    except RequestError as exc:
        raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
    except EngineOverloadedError as exc:
        raise overloaded(exc) from None
    except RuntimeError as exc:  # the engine is closed (server shutting down)
        raise closed(exc) from None
    try:
        vectors = await asyncio.wrap_future(future)
    except FermiError as exc:
        raise ApiError(500, str(exc), type="server_error") from None
    tokens = sum(map(len, ids))
    reply = await asyncio.to_thread(encode, vectors, body.encoding_format, model, tokens)
    return reply, tokens


def encode(vectors: torch.Tensor, encoding_format: str | None, model: str, tokens: int) -> bytes:
    if encoding_format == "base64":
        rows = vectors.numpy().astype("<f4", copy=False)
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        data = vectors.tolist()
    items = [Embedding(index=i, embedding=vector) for i, vector in enumerate(data)]
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return ENCODER.encode(EmbeddingList(data=items, model=model, usage=usage))
