"""Where the KV cache lives and gets written.

Attention takes its cache as an injected object with two methods, ``write`` (store this
step's keys and values) and ``read`` (what the step's queries attend over). The engine
injects :class:`KVCache`, a static buffer per layer indexed by slot; the Core ML export
wrapper (``export/wrapper.py``) injects a slice of model state and runs the same attention.
The ONNX export injects an :class:`AttendingCache`, which takes the attention itself: its
cache write and attention are one onnxruntime operator (GroupQueryAttention), the node
the ecosystem's runtimes update their caches in place with.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from fermi import memory
from fermi.models.context import StepContext


class Cache(Protocol):
    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> None:
        """Store this step's keys and values k/v [B, Hkv, T, D] at ``ctx.positions``."""

    def read(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, Hkv, L, D] for the step's queries, L = ``ctx.kv_len``."""


class AttendingCache(nn.Module):
    """A cache that also computes attention (an exporter's fused operator): attention hands
    it the step's rotated queries q [B, T, H, D] and keys/values [B, T, Hkv, D] and takes
    its output [B, T, H * D] instead of writing, reading and attending itself."""

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        raise NotImplementedError


class KVCache(nn.Module):
    """Two buffers [max_batch, kv_heads, max_seq_len, head_dim]; row ``s`` is cache slot ``s``.

    ``dtype`` is what the buffers hold; ``compute`` (default: the same) what attention
    computes in. A narrower store (fp16 on CPU for a float32 model whose weights are stored
    in 16 bits or fewer) rounds each key and value once as it is written, and ``read``
    widens them back (``Attention.attend`` rounds a prompt's own keys the same way, so that
    reading them back from the cache later gives the same attention)."""

    def __init__(
        self,
        max_batch: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype,
        device,
        compute: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.compute = compute or dtype
        shape = (max_batch, kv_heads, max_seq_len, head_dim)
        for name in ("k", "v"):
            if torch.device(device).type == "cpu":  # resident only where written
                buffer = memory.lazy_zeros(shape, dtype)
            else:
                buffer = torch.zeros(shape, dtype=dtype, device=device)
            self.register_buffer(name, buffer, persistent=False)
        # Zeroed counters for the split decode kernel (fermi.models.split_decode).
        counters = torch.zeros(max_batch * kv_heads, dtype=torch.int32, device=device)
        self.register_buffer("counters", counters, persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # A conversion of the model (.half(), .to(torch.bfloat16), .float()) converts the
        # activations as well as the buffers: ``compute`` follows it, or ``read`` would
        # widen keys to a dtype the queries no longer have.
        probe = torch.empty(0, dtype=self.compute, device=self.k.device)
        out = super()._apply(fn, *args, **kwargs)
        self.compute = fn(probe).dtype
        return out

    @property
    def rounds(self) -> bool:
        """Whether the buffers hold a narrower dtype than attention computes in."""
        return self.k.dtype != self.compute

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> None:
        """Write k/v [B, H, T, D] in place at (ctx.slots[b], :, ctx.positions[b, t])."""
        slots, positions = ctx.slots, ctx.positions
        if k.dtype != self.k.dtype:
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if torch.compiler.is_compiling():
            # Compiled, an in-place write through a transposed view of the buffer becomes a
            # copy of the whole cache (functionalization writes the view back): index the
            # buffer itself, which Inductor fuses into one small scatter with the rope.
            index = slots[:, None].expand_as(positions)
            self.k[index, :, positions] = k.transpose(1, 2)
            self.v[index, :, positions] = v.transpose(1, 2)
            return
        # Eager, on the [B, S, H, D] view of the cache, (slots[b], positions[b, t]) picks the
        # [H, D] entry of each token: one index_put_ per buffer, no index expansion.
        index = (slots[:, None], positions)
        self.k.transpose(1, 2).index_put_(index, k.transpose(1, 2))
        self.v.transpose(1, 2).index_put_(index, v.transpose(1, 2))

    def read(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``ctx.kv_len`` positions of the rows' slots (a view of the buffers when
        ``ctx.read_slots`` is None, meaning rows 0..B-1 are slots 0..B-1)."""
        kv_len = ctx.kv_len
        if ctx.read_slots is None:
            batch = ctx.positions.shape[0]
            k, v = self.k[:batch, :, :kv_len], self.v[:batch, :, :kv_len]
        else:
            k, v = self.k[ctx.read_slots, :, :kv_len], self.v[ctx.read_slots, :, :kv_len]
        if self.rounds:
            k, v = k.to(self.compute), v.to(self.compute)
        return k, v

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst``."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class StepCache(nn.Module):
    """The keys and values of one forward alone, dropped after it: attention over a whole
    input at once (positions 0..T-1, ``kv_len`` = T) without a slot of the engine's cache,
    which embedding inputs (``Decoder.last_token_states``) must leave as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> None:
        self.kv = (k, v)

    def read(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.kv is not None, "write() comes first"
        return self.kv
