"""The Python API: ``Engine.generate`` / ``stream`` / ``astream`` over one scheduler, and
``Engine.embed`` / ``aembed`` for embedding checkpoints.

``astream`` takes deltas from the engine thread through a pulled
:class:`~fermi.engine.channel.Channel`: the loop is woken only when the stream's consumer
waits, and one wake-up serves every stream of the loop that became ready before it ran. A
consumer that keeps up still costs one wake-up per engine step; one that falls behind takes
the deltas that piled up without any (perf/notes_serve.md section 5).
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from fermi.engine.channel import Channel
from fermi.engine.core import STALL_SECONDS, EngineCore, EngineStats
from fermi.engine.embeddings import EmbeddingInput, EmbeddingJob, check_dimensions, token_lists
from fermi.engine.requests import ChatPrompt, RequestBuilder, SamplingSettings
from fermi.engine.scheduler import RequestHandle
from fermi.engine.types import (
    Completion,
    Delta,
    GenerationRequest,
    Thinking,
    TokenLogprob,
    Usage,
)
from fermi.errors import RequestError
from fermi.grammar import Grammar, GrammarCompiler
from fermi.loading import EmbeddingSpec, GenerationDefaults
from fermi.runners.base import Runner
from fermi.text.tokenizer import Tokenizer
from fermi.text.tools import Tool, ToolCall, ToolChoice, merge_calls

__all__ = ["STALL_SECONDS", "ChatPrompt", "Engine", "EngineStats", "RequestHandle"]


class Engine:
    """A loaded model ready to generate. Thread-safe: concurrent calls share the batch."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        generation: GenerationDefaults,
        model_name: str,
        max_waiting: int = 1024,
        prefix_reuse: bool = True,
        embedding: EmbeddingSpec | None = None,
        warm_grammars: bool = True,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        # Set for an embedding checkpoint (fermi.loading.embedding_spec): embed() serves it.
        self.embedding = embedding
        self.capabilities = runner.capabilities
        caps = self.capabilities
        eos = frozenset(generation.eos_token_ids)
        self.grammars = GrammarCompiler(tokenizer, eos, caps.vocab_size)  # (prepared when idle)
        self.requests = RequestBuilder(
            tokenizer, generation, caps.vocab_size, caps.max_seq_len, self.grammars, model_name
        )
        self._core = EngineCore(
            runner, tokenizer, max_waiting, prefix_reuse, self.grammars, warm_grammars
        )

    def stats(self) -> EngineStats:
        """Counters of the engine now (running, waiting, tokens, the last step's time)."""
        return self._core.stats()

    @property
    def capacity(self) -> int:
        """Requests held at once (running plus waiting); ``submit`` refuses beyond."""
        return self._core.capacity

    @property
    def load(self) -> int:
        """Requests submitted and not yet finished (used to pick the least loaded replica)."""
        return self._core.load

    @property
    def max_seq_len(self) -> int:
        return self.capabilities.max_seq_len

    @property
    def max_batch(self) -> int:
        return self.capabilities.max_batch

    @property
    def generates(self) -> bool:
        """Whether the model can generate text: every model but an embedding checkpoint
        without an lm_head of its own (Qwen3-Embedding-8B's is not tied)."""
        return self.embedding is None or self.embedding.generates

    @property
    def supports_thinking(self) -> bool:
        return self.requests.supports_thinking

    @property
    def generation(self) -> GenerationDefaults:
        """The model's generation defaults, under every request's own settings."""
        return self.requests.generation

    @generation.setter
    def generation(self, value: GenerationDefaults) -> None:
        self.requests.generation = value

    # -- requests ---------------------------------------------------------------------

    def chat_prompt(
        self,
        messages: Sequence[dict],
        thinking: Thinking = "auto",
        tools: Sequence[dict | Tool] | None = None,
    ) -> ChatPrompt:
        """Render ``messages`` (and ``tools``, OpenAI's shape) with the model's chat template
        for a thinking mode."""
        return self.requests.chat_prompt(messages, thinking, tools)

    def build_request(
        self,
        *,
        messages: Sequence[dict] | None = None,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        thinking: Thinking = "auto",
        truncate: bool = False,
        skip_special_tokens: bool = True,
        settings: SamplingSettings | None = None,
        tools: Sequence[dict | Tool] | None = None,
        tool_choice: str | dict | ToolChoice | None = None,
        parallel_tool_calls: bool | None = None,
        grammar: Grammar | dict | None = None,
        response_format: dict | None = None,
        **values: Any,
    ) -> GenerationRequest:
        """Validate and resolve a request; raises :class:`RequestError` naming the field.

        Give one of ``messages``, ``prompt`` or ``prompt_token_ids``. The sampling settings
        (``max_tokens=``, ``temperature=``, ...: the fields of :class:`SamplingSettings`)
        come as keyword arguments, as ``settings`` (a :class:`SamplingSettings`, or a dict
        of its fields), or both: a keyword wins, unless it is None (not given, as wrappers
        pass "unset"), which leaves the setting as ``settings`` has it. ``truncate``
        keeps the end of a prompt longer than the context instead of refusing it.
        ``tools``, ``tool_choice`` and ``parallel_tool_calls`` are OpenAI's (chat only):
        the reply's calls arrive as ``tool_calls``; ``required`` or a named function makes
        the model call one. ``response_format`` (OpenAI's ``json_object`` / ``json_schema``
        shapes) or ``grammar`` constrain the output (see :mod:`fermi.grammar`).
        """
        if not self.generates:
            raise RequestError(
                f"{self.model_name} is an embedding checkpoint without an lm_head: it cannot "
                "generate text; ask it for embeddings (Engine.embed, POST /v1/embeddings)",
                "model",
            )
        return self.requests.build(
            messages=messages,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            settings=SamplingSettings.of(settings).updated(values),
            thinking=thinking,
            truncate=truncate,
            skip_special_tokens=skip_special_tokens,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            grammar=grammar,
            response_format=response_format,
        )

    # -- running ----------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink, group: object = None) -> RequestHandle:
        """Low level: queue a prepared request; ``sink(delta)`` is called from the engine
        thread for every delta. Front ends with their own event loop use this. Requests
        submitted with the same ``group`` (any hashable: the choices and prompts of one
        API call) take free slots as one client: a request of another group waiting
        behind them gets the next slot that frees (``fermi.engine.scheduler.WaitingQueue``)."""
        return self._core.submit(request, sink, group)

    def stream(self, **kwargs) -> Iterator[Delta]:
        """Yield deltas as they are generated. Closing the iterator cancels the request."""
        request = self.build_request(**kwargs)
        return self.stream_request(request)

    def stream_request(self, request: GenerationRequest) -> Iterator[Delta]:
        box: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        handle = self.submit(request, box.put)
        try:
            yield from _until_final(box)
        finally:
            handle.cancel()

    def astream(self, **kwargs) -> AsyncIterator[Delta]:
        """``stream`` for asyncio code. Leaving the ``async for`` early (``break``, an
        exception, a cancelled task) cancels the request once the iterator is closed: by the
        event loop when it is released, or at once by ``aclose()``. Bad arguments raise on
        the first iteration."""
        return self._deltas(None, kwargs, raise_errors=True)

    def astream_request(
        self,
        request: GenerationRequest,
        on_submit: Callable[[RequestHandle], object] | None = None,
    ) -> AsyncIterator[Delta]:
        """Low level: deltas of a prepared request; a failure arrives as a final delta with
        ``error`` set (front ends turn it into their own error shape). ``on_submit(handle)``
        is called once it is queued, for a front end that cancels it from elsewhere (the
        stream then ends with finish_reason ``cancelled``)."""
        return self._deltas(request, None, raise_errors=False, on_submit=on_submit)

    async def _deltas(
        self,
        request: GenerationRequest | None,
        kwargs: dict | None,
        raise_errors: bool,
        on_submit: Callable[[RequestHandle], object] | None = None,
    ) -> AsyncIterator[Delta]:
        if request is None:  # templating and tokenising off the event loop
            request = await asyncio.to_thread(self.build_request, **(kwargs or {}))
        channel: Channel[Delta] = Channel()
        handle = self.submit(request, channel.put)
        if on_submit is not None:
            on_submit(handle)
        try:
            async for batch in channel:
                for delta in batch:
                    if raise_errors and delta.error:
                        raise delta.exception()
                    yield delta
                    if delta.finish_reason is not None:
                        return
        finally:
            channel.close()
            handle.cancel()

    def generate(self, **kwargs) -> Completion:
        """Generate to the end and return the whole completion."""
        request = self.build_request(**kwargs)
        return self.generate_request(request)

    def generate_request(self, request: GenerationRequest) -> Completion:
        text, reasoning, ids = [], [], []
        calls: list[ToolCall] = []
        logprobs: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        box: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        handle = self.submit(request, box.put)
        try:
            for delta in _until_final(box):
                text.append(delta.text)
                reasoning.append(delta.reasoning)
                ids.extend(delta.token_ids)
                if delta.tool_calls:
                    calls = merge_calls(calls, delta.tool_calls)
                if logprobs is not None and delta.logprobs:
                    logprobs.extend(delta.logprobs)
        finally:
            handle.cancel()
        first = handle.first_token_at or handle.finished_at or handle.submitted_at
        return Completion(
            text="".join(text),
            reasoning="".join(reasoning),
            token_ids=ids,
            finish_reason=delta.finish_reason,
            usage=delta.usage or Usage(len(request.prompt_ids), len(ids)),
            logprobs=logprobs,
            time_to_first_token=first - handle.submitted_at,
            decode_time=(handle.finished_at or first) - first,
            tool_calls=calls,
        )

    # -- embeddings -------------------------------------------------------------------

    def embed(self, input: EmbeddingInput, dimensions: int | None = None) -> torch.Tensor:
        """The embedding of each input: a float32 tensor [inputs, dimensions] on the CPU,
        each row L2-normalised (so a dot product is the cosine similarity).

        ``input`` is a string, a list of strings, a list of token ids, or a list of such
        lists (OpenAI's forms; one string or one id list still gives one row). Texts are
        tokenised with the tokenizer's special tokens (Qwen3-Embedding's appends
        ``<|endoftext|>``); token ids are taken as given. ``dimensions`` keeps the first
        entries and normalises again (Matryoshka). Runs beside generation, batched.
        Raises :class:`RequestError` for a model that is not an embedding checkpoint, a
        runner that cannot embed (ONNX, Core ML), or a bad input (empty, over 2048 items,
        longer than the context)."""
        return self.submit_embedding(self.embedding_ids(input), dimensions).result()

    async def aembed(self, input: EmbeddingInput, dimensions: int | None = None) -> torch.Tensor:
        """``embed`` for asyncio code: tokenising runs in a worker thread."""
        ids = await asyncio.to_thread(self.embedding_ids, input)
        return await asyncio.wrap_future(self.submit_embedding(ids, dimensions))

    def embedding_ids(self, input: EmbeddingInput) -> list[list[int]]:
        """The token ids ``embed`` runs for ``input``, checked (see ``embed``)."""
        self._check_embeds()
        return token_lists(input, self.requests)

    def submit_embedding(
        self, token_ids: list[list[int]], dimensions: int | None = None
    ) -> Future[torch.Tensor]:
        """Low level: queue ``embedding_ids``' result; the future gets ``embed``'s tensor.
        Cancelling the future drops the batches not yet run."""
        self._check_embeds()
        assert self.embedding is not None
        size = check_dimensions(dimensions, self.embedding.hidden_size)
        job = EmbeddingJob(token_ids, size, self.capabilities.prefill_chunk)
        self._core.submit_embedding(job)
        return job.future

    def _check_embeds(self) -> None:
        name = self.capabilities.name
        if self.embedding is None and not self.capabilities.embeds:  # e.g. an export folder
            raise RequestError(
                f"{self.model_name}, run by the {name} runner, cannot compute embeddings: "
                "only an embedding checkpoint (such as Qwen/Qwen3-Embedding-0.6B) loaded from "
                "its folder with the torch-cpu or torch-cuda runner does",
                "model",
            )
        if not self.capabilities.embeds:
            raise RequestError(
                f"the {name} runner cannot compute embeddings; load the checkpoint folder "
                "with the torch-cpu or torch-cuda runner",
                "model",
            )
        if self.embedding is None:
            raise RequestError(
                f"{self.model_name} is not an embedding checkpoint: its folder has no "
                "sentence-transformers pooling config (modules.json, 1_Pooling/config.json) "
                "and its weights have an lm_head; serve an embedding model such as "
                "Qwen/Qwen3-Embedding-0.6B",
                "model",
            )

    def release_session(self, session: str) -> None:
        """Drop the KV cache kept for requests with ``session`` set (see GenerationRequest)."""
        self._core.release_session(session)

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _until_final(box: queue.SimpleQueue[Delta]) -> Iterator[Delta]:
    """The synchronous API's hand-off: the caller's thread blocks on the engine's deltas
    (no event loop to wake), up to the final one; a failure raises."""
    while True:
        delta = box.get()
        if delta.error:
            raise delta.exception()
        yield delta
        if delta.finish_reason is not None:
            return
