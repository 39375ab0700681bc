"""The Python API: ``Engine.generate`` / ``stream`` / ``astream`` over one scheduler.

``astream`` takes deltas from the engine thread through a pulled
:class:`~fermi.engine.channel.Channel`: the loop is woken only when the stream's consumer
waits, and one wake-up serves every stream of the loop that became ready before it ran. A
consumer that keeps up still costs one wake-up per engine step; one that falls behind takes
the deltas that piled up without any (perf/notes_serve.md section 5).
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from fermi.engine.channel import Channel
from fermi.engine.sampling import SamplingParams
from fermi.engine.scheduler import RequestHandle, Scheduler
from fermi.engine.types import (
    Completion,
    Delta,
    GenerationRequest,
    Thinking,
    TokenLogprob,
    Usage,
)
from fermi.errors import FermiError, RequestError
from fermi.loading import GenerationDefaults
from fermi.runners.base import Runner
from fermi.text.tokenizer import Tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Qwen3's recommended sampling when thinking is off (its generation_config holds the
# thinking-mode values); applied only when a request sets no sampling knob itself.
# Temperatures below this are treated as greedy.
MIN_TEMPERATURE = 1e-5

NON_THINKING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


@dataclass(frozen=True)
class ChatPrompt:
    token_ids: list[int]
    text: str
    start_in_reasoning: bool
    thinking: Thinking


class Engine:
    """A loaded model ready to generate. Thread-safe: concurrent calls share the batch."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        generation: GenerationDefaults,
        model_name: str,
        max_waiting: int = 1024,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.generation = generation
        self.model_name = model_name
        self.capabilities = runner.capabilities
        self.scheduler = Scheduler(runner, tokenizer, max_waiting=max_waiting)

    @property
    def max_seq_len(self) -> int:
        return self.capabilities.max_seq_len

    @property
    def max_batch(self) -> int:
        return self.capabilities.max_batch

    @property
    def supports_thinking(self) -> bool:
        template = self.tokenizer.chat_template or ""
        return THINK_OPEN in template or "enable_thinking" in template

    # -- prompts ----------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[dict], thinking: Thinking = "auto") -> ChatPrompt:
        """Render ``messages`` with the model's chat template for a thinking mode."""
        if thinking not in ("on", "off", "auto"):
            raise RequestError(f"thinking must be on, off or auto, not {thinking!r}", "thinking")
        enable = {"on": True, "off": False, "auto": None}[thinking]
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, enable_thinking=enable
            )
        except FermiError:
            raise
        except ValueError as exc:
            raise RequestError(str(exc), "messages") from None
        opened = text.rstrip().endswith(THINK_OPEN)
        if thinking == "off" and opened:
            # A template that always opens the think block (R1 distills): close it at once.
            text = text + ("" if text.endswith("\n") else "\n") + THINK_CLOSE + "\n\n"
            opened = False
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ChatPrompt(ids, text, opened, thinking)

    def build_request(
        self,
        *,
        messages: Sequence[dict] | None = None,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        thinking: Thinking = "auto",
        ignore_eos: bool = False,
        logprobs: int | None = None,
        truncate: bool = False,
        skip_special_tokens: bool = True,
    ) -> GenerationRequest:
        """Validate and resolve a request; raises :class:`RequestError` naming the field."""
        given = [x is not None for x in (messages, prompt, prompt_token_ids)]
        if sum(given) != 1:
            raise RequestError("pass exactly one of messages, prompt, prompt_token_ids", "messages")
        if thinking not in ("on", "off", "auto"):
            raise RequestError(f"thinking must be on, off or auto, not {thinking!r}", "thinking")
        split, start_in_reasoning, mode = False, False, thinking
        if messages is not None:
            if not messages:
                raise RequestError("messages must not be empty", "messages")
            chat = self.chat_prompt(messages, thinking)
            ids, split, start_in_reasoning = chat.token_ids, True, chat.start_in_reasoning
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise RequestError("prompt must be a string", "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(t) for t in prompt_token_ids]  # type: ignore[union-attr]
            vocab = self.capabilities.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(
                    f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                    "prompt_token_ids",
                )
        if not ids:
            raise RequestError("the prompt is empty", "prompt")

        limit = self.max_seq_len
        _check_types(max_tokens=max_tokens, seed=seed, logprobs=logprobs, stop=stop)
        if max_tokens is not None and max_tokens < 1:
            raise RequestError("max_tokens must be at least 1", "max_tokens")
        if len(ids) >= limit:
            if not truncate:
                raise RequestError(
                    f"the prompt has {len(ids)} tokens; this engine's context is {limit} "
                    "(pass truncate=True to keep the end of the prompt)",
                    "messages" if messages is not None else "prompt",
                )
            # Without max_tokens, leave a quarter of the context for the reply.
            keep = max(1, limit - (max_tokens or max(1, limit // 4)))
            ids = ids[-keep:]
        budget = limit - len(ids)
        max_tokens = budget if max_tokens is None else min(max_tokens, budget)

        params = self._sampling(
            mode if messages is not None else "auto",
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            seed=seed,
        )
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise RequestError("top_logprobs must be between 0 and 20", "top_logprobs")
        return GenerationRequest(
            prompt_ids=tuple(ids),
            params=params,
            max_tokens=max_tokens,
            stop=stops,
            eos_token_ids=frozenset(self.generation.eos_token_ids),
            ignore_eos=ignore_eos,
            split_reasoning=split,
            start_in_reasoning=start_in_reasoning,
            logprobs=logprobs,
            skip_special_tokens=skip_special_tokens,
        )

    def _sampling(self, mode: Thinking, **given) -> SamplingParams:
        gen = self.generation
        knobs = ("temperature", "top_p", "top_k", "min_p")
        chosen = {k: given[k] for k in knobs if given[k] is not None}
        if not chosen and mode == "off" and self.supports_thinking:
            chosen = dict(NON_THINKING_DEFAULTS)
        defaults = {
            "temperature": gen.temperature if gen.temperature is not None else 1.0,
            "top_p": gen.top_p if gen.top_p is not None else 1.0,
            "top_k": gen.top_k if gen.top_k is not None else 0,
            "min_p": gen.min_p if gen.min_p is not None else 0.0,
        }
        if gen.do_sample is False:
            defaults["temperature"] = 0.0
        values = {k: chosen.get(k, defaults[k]) for k in knobs}
        rep = given["repetition_penalty"]
        if rep is None:
            rep = gen.repetition_penalty if gen.repetition_penalty is not None else 1.0
        temperature = float(values["temperature"])
        if 0.0 < temperature < MIN_TEMPERATURE:
            temperature = 0.0  # dividing by it would overflow the logits: it is greedy anyway
        params = SamplingParams(
            temperature=temperature,
            top_k=int(values["top_k"] or 0),
            top_p=float(values["top_p"]),
            min_p=float(values["min_p"]),
            repetition_penalty=float(rep),
            presence_penalty=float(given["presence_penalty"] or 0.0),
            frequency_penalty=float(given["frequency_penalty"] or 0.0),
            seed=given["seed"],
        )
        try:
            params.validate()
        except ValueError as exc:
            raise RequestError(str(exc), _field_of(str(exc))) from None
        return params

    # -- running ----------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink) -> RequestHandle:
        """Low level: queue a prepared request; ``sink(delta)`` is called from the engine
        thread for every delta. Front ends with their own event loop use this."""
        return self.scheduler.submit(request, sink)

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

    def astream_request(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Low level: deltas of a prepared request; a failure arrives as a final delta with
        ``error`` set (front ends turn it into their own error shape)."""
        return self._deltas(request, None, raise_errors=False)

    async def _deltas(
        self, request: GenerationRequest | None, kwargs: dict | None, raise_errors: bool
    ) -> AsyncIterator[Delta]:
        if request is None:
            request = self.build_request(**(kwargs or {}))
        channel: Channel[Delta] = Channel()
        handle = self.submit(request, channel.put)
        try:
            async for batch in channel:
                for delta in batch:
                    if raise_errors and delta.error:
                        raise FermiError(delta.error)
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
        logprobs: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        box: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        handle = self.submit(request, box.put)
        try:
            for delta in _until_final(box):
                text.append(delta.text)
                reasoning.append(delta.reasoning)
                ids.extend(delta.token_ids)
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
        )

    def release_session(self, session: str) -> None:
        """Drop the KV cache kept for requests with ``session`` set (see GenerationRequest)."""
        self.scheduler.release_session(session)

    def close(self) -> None:
        self.scheduler.close()

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
            raise FermiError(delta.error)
        yield delta
        if delta.finish_reason is not None:
            return


def _check_types(**values) -> None:
    """Types a caller from outside Python (JSON, gRPC) could get wrong."""
    for name in ("max_tokens", "seed", "logprobs"):
        value = values[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"{name} must be an integer, not {value!r}", name)
    stop = values["stop"]
    if stop is not None and not isinstance(stop, str) and not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of strings", "stop")


def _field_of(message: str) -> str | None:
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
    ):
        if name in message:
            return name
    return None
