"""Embeddings: inputs checked and tokenised, run in batches between generation steps, pooled.

An embedding checkpoint (``fermi.loading.EmbeddingSpec``) turns an input into the final
hidden state at its last token, L2-normalised. Texts are tokenised with the tokenizer's
special tokens: Qwen3-Embedding's appends ``<|endoftext|>``, whose state is the one pooled.
Token-id inputs are taken as they are. ``dimensions`` keeps the first entries of the state
and normalises again (Matryoshka representation learning, which Qwen3-Embedding is trained
for: any length from 32 to the hidden size serves).

A request becomes an :class:`EmbeddingJob` that the engine thread runs between steps, one
batch at a time (jobs take turns): a batch holds at most ``prefill_chunk`` padded tokens
(an input longer than that runs alone), so a large request delays running generations by
one batch per step, as a long prompt's chunked prefill does. The forward writes no cache
slot (``Runner.embed``).
"""

from __future__ import annotations

import contextlib
import numbers
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

import torch
import torch.nn.functional as F

from fermi.engine.requests import RequestBuilder, check_text
from fermi.errors import FermiError, RequestError
from fermi.runners.base import Runner

# Inputs in one request: OpenAI's bound.
MAX_INPUTS = 2048

EmbeddingInput = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


def input_items(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's four ``input`` forms (a string, strings, token ids, lists of token ids) as
    a list of strings or of token-id lists; a RequestError naming ``input`` otherwise."""
    if isinstance(value, str):
        items: list = [value]
    elif isinstance(value, bytes | bytearray | memoryview) or (
        isinstance(value, Sequence)
        and any(isinstance(s, bytes | bytearray | memoryview) for s in value)
    ):  # (bytes are a sequence of ints: they would pass as token ids)
        raise RequestError("input must be text (str), not bytes: decode it first", "input",
                           "invalid_type")  # fmt: skip
    elif isinstance(value, Sequence) and value and all(_is_id(t) for t in value):
        items = [list(value)]
    elif isinstance(value, Sequence) and value and all(isinstance(s, str) for s in value):
        items = list(value)
    elif (
        isinstance(value, Sequence)
        and value
        and all(isinstance(s, Sequence) and not isinstance(s, str) for s in value)
        and all(_is_id(t) for s in value for t in s)
    ):
        items = [list(s) for s in value]
    else:
        raise RequestError(
            "input must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists, and not empty",
            "input",
            "invalid_type",
        )
    if len(items) > MAX_INPUTS:
        raise RequestError(f"input takes at most {MAX_INPUTS} items, not {len(items)}", "input")
    for i, item in enumerate(items):
        if not item:
            where = _where(i, len(items))
            raise RequestError(f"{where} is empty", where)
    return items


def token_lists(value: Any, builder: RequestBuilder) -> list[list[int]]:
    """The token ids of every input, each checked against the vocabulary and the context.
    The cheap bounds (the number of inputs, each text's length) come before any text is
    tokenised."""
    items = input_items(value)
    limit, vocab = builder.max_seq_len, builder.vocab_size
    texts = isinstance(items[0], str)
    if texts:
        for i, text in enumerate(items):
            if len(text) > builder.max_prompt_chars:
                raise _too_long(f"{len(text)} characters", limit, _where(i, len(items)))
            check_text(text, _where(i, len(items)))
        tokenizer = builder.tokenizer
        ids = [tokenizer.encode(text, add_special_tokens=True) for text in items]
    else:
        ids = items
    for i, tokens in enumerate(ids):
        where = _where(i, len(ids))
        if len(tokens) > limit:
            raise _too_long(f"{len(tokens)} tokens", limit, where)
        if not texts:
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(
                    f"token id {bad} is outside the vocabulary (0..{vocab - 1})", where
                )
    return ids


def check_dimensions(dimensions: Any, hidden_size: int) -> int:
    """The vector length a request asks for (None: the whole hidden state)."""
    if dimensions is None:
        return hidden_size
    if not _is_id(dimensions):
        raise RequestError(
            f"dimensions must be an integer, not {dimensions!r}", "dimensions", "invalid_type"
        )
    if not 1 <= dimensions <= hidden_size:
        raise RequestError(
            f"dimensions must be between 1 and this model's {hidden_size}, not {dimensions}",
            "dimensions",
        )
    return int(dimensions)


def plan_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Input indices grouped into batches of at most ``budget`` padded tokens (a batch pads
    its inputs to its longest); inputs of like length share a batch, so little is padding.
    An input longer than ``budget`` makes a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:  # ascending: the input joining a batch is its longest
        batch = batches[-1] if batches else None
        if batch is not None and (len(batch) + 1) * lengths[i] <= budget:
            batch.append(i)
        else:
            batches.append([i])
    return batches


class EmbeddingJob:
    """One request's inputs on the engine thread: a batch per ``run_batch`` call, and the
    vectors [len(token_ids), dimensions] (float32, on the host) in ``future`` at the end.
    A cancelled future stops the job before its next batch."""

    def __init__(self, token_ids: list[list[int]], dimensions: int, budget: int) -> None:
        self.token_ids = token_ids
        self.dimensions = dimensions
        self.batches = deque(plan_batches([len(t) for t in token_ids], budget))
        self.vectors = torch.empty(len(token_ids), dimensions)
        self.future: Future[torch.Tensor] = Future()

    def run_batch(self, runner: Runner) -> bool:
        """Embed the next batch; whether the job is over (done, or cancelled)."""
        if self.future.cancelled():
            return True
        rows = self.batches.popleft()
        hidden = runner.embed([self.token_ids[i] for i in rows])
        pooled = F.normalize(hidden[:, : self.dimensions].float(), dim=-1)
        self.vectors[rows] = pooled.cpu()
        if self.batches:
            return False
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            self.future.set_result(self.vectors)
        return True

    def fail(self, message: str) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(FermiError(message))


def _is_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _where(i: int, n: int) -> str:
    return "input" if n == 1 else f"input[{i}]"


def _too_long(size: str, limit: int, where: str) -> RequestError:
    return RequestError(
        f"{where} has {size}, more than this engine's context of {limit} tokens",
        where,
        "context_length_exceeded",
    )
