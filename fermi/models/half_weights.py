"""Half-precision weight storage for float32 inference on CPU.

Decoding one token reads every weight once, so on CPU it is bound by memory bandwidth:
fp16 weights halve the bytes. Activations and the KV cache stay float32.

On x86 the weights are packed once, at load, for FBGEMM's fp16 matrix product
(``quantized.linear_prepack_fp16``: fp16 weights converted in registers, float32
activations and accumulation). Measured on SmolLM2-135M's shapes (perf/LOG.md,
``perf/micro_cpu_batched.py``), one thread, a step's 121 products: 10 ms at 1 row, 20 ms at
4 and 8, 135 ms at 64, against 16 / 72 / 187 / 1582 ms for torch's plain fp16 product and
43 / 72 / 78 / 410 ms for float32 weights. So one kernel serves every row count: no weight
is copied or up-cast in any step, and batched decode costs little more than one row.

Without FBGEMM (ARM) the weights stay an fp16 tensor: products of few rows use torch's fp16
matrix-vector kernel, larger ones first upcast the weight into a float32 scratch buffer
shared by all layers (torch's fp16 matrix-matrix path is ~10x slower than fp32).
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fermi.memory import release_free_heap

# Without FBGEMM, up to this many rows (tokens x batch) the fp16 matrix-vector path wins.
DIRECT_ROWS = 2
# At most this many threads pack weights at load (see use_half_weights).
PACK_THREADS = 4
# use_half_weights hands the C heap's free pages back after this many packed layers.
TRIM_EVERY = 8


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


# Compiled code cannot take the pack (a TorchScript object) as an input: Dynamo refuses it.
# It takes a one-element tensor naming the layer instead (a buffer, so one compiled layer
# serves every layer), and this operator finds the pack by that number.
_PACKED: weakref.WeakValueDictionary[int, HalfWeightLinear] = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()


@torch.library.custom_op("fermi::packed_fp16_linear", mutates_args=())
def packed_fp16_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """The product of float32 ``x`` and the packed weight of the layer ``handle`` names."""
    return torch.ops.quantized.linear_dynamic_fp16(x, _PACKED[int(handle)]._pack)


@packed_fp16_linear.register_fake
def _(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class HalfWeightLinear(nn.Module):
    """``nn.Linear`` with an fp16 weight and float32 arithmetic.

    Packed for FBGEMM (x86): takes float32 inputs (others are converted) and returns float32
    at every row count. Unpacked (without FBGEMM): returns float32, except for products of
    few rows without a bias, which return the fp16 kernel's output; callers promote it
    (``x + out``) or convert it (``.float()``, ``.to(dtype)``) where they need float32.
    ``weight`` (fp16) and ``bias`` (float32) read the stored values in either case.
    """

    def __init__(
        self,
        linear: nn.Linear,
        scratch: list[torch.Tensor | None],
        packed: bool | None = None,
        pack: Any = None,
    ) -> None:
        """``pack``: ``prepack(linear)``, when the caller made it (on another thread)."""
        super().__init__()
        self.packed = fbgemm_available() if packed is None else packed
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.out_features, self.in_features = weight.shape
        if self.packed:
            self._pack = prepack(linear) if pack is None else pack
            number = next(_NUMBERS)
            _PACKED[number] = self
            self.register_buffer("_handle", torch.tensor([number]), persistent=False)
            return
        self._weight = nn.Parameter(weight.half(), requires_grad=False)
        self._bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # One float32 buffer for the whole model, grown to the largest weight upcast.
        self._scratch = scratch

    @property
    def weight(self) -> torch.Tensor:
        if self.packed:
            return torch.ops.quantized.linear_unpack_fp16(self._pack)[0].half()
        return self._weight

    @property
    def bias(self) -> torch.Tensor | None:
        if self.packed:
            return torch.ops.quantized.linear_unpack_fp16(self._pack)[1]
        return self._bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            if x.dtype != torch.float32:
                x = x.float()
            if torch.compiler.is_compiling():
                return packed_fp16_linear(x, self._handle, self.out_features)
            return torch.ops.quantized.linear_dynamic_fp16(x, self._pack)
        rows = x.numel() // x.shape[-1]
        if rows <= DIRECT_ROWS:
            # The fp16 kernel's output stays fp16 (it is rounded to fp16 anyway): the next
            # op promotes it (a residual add, a bias) or takes it as is (the MLP's product
            # feeding down_proj), which saves a cast on either side of most products.
            x16 = x if x.dtype == torch.float16 else x.to(torch.float16)
            out = F.linear(x16, self._weight)
            return out if self._bias is None else out + self._bias
        if x.dtype != torch.float32:
            x = x.float()
        return F.linear(x, self._upcast(), self._bias)

    def _upcast(self) -> torch.Tensor:
        buf = self._scratch[0]
        weight = self._weight
        if buf is None or buf.numel() < weight.numel():
            buf = torch.empty(weight.numel(), dtype=torch.float32)
            self._scratch[0] = buf
        return buf[: weight.numel()].view(weight.shape).copy_(weight)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, packed={self.packed}"


def prepack(linear: nn.Linear) -> Any:
    """FBGEMM's pack of ``linear``: its weight rounded to fp16 (and its bias in float32) in
    FBGEMM's blocked layout. Rounding through ``.half()`` first makes it the same values as
    the unpacked path. The operator releases the GIL: packs can be made on several threads."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach().float()
    return torch.ops.quantized.linear_prepack_fp16(weight.half().float(), bias)


def use_half_weights(model: nn.Module, packed: bool | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of a CPU model (float32, or with its linear weights
    already in fp16) by a :class:`HalfWeightLinear` (``packed``: FBGEMM's layout; None:
    where FBGEMM is available).

    A tied ``lm_head`` gets its own fp16 copy: the float32 embedding is only gathered from
    (one row per token), while the head is read whole every step.

    FBGEMM's packing converts one value at a time (SmolLM2-135M's 122 products: ~0.65 s on
    one core of this project's CPU), so packs are made on up to ``PACK_THREADS`` of torch's
    threads, one layer each in flight (``perf/LOG.md`` run 32): each holds a float32 copy
    of its weight while it packs, so the load's peak grows with the threads, not the model.
    """
    scratch: list[torch.Tensor | None] = [None]
    packed = fbgemm_available() if packed is None else packed
    # Parents and names only: a list that held the nn.Linear modules would keep every float
    # weight alive until the end; each goes as its layer is replaced.
    slots = [
        (parent, name)
        for parent in model.modules()
        if not isinstance(parent, nn.Linear)
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    workers = min(torch.get_num_threads(), PACK_THREADS) if packed else 1
    if workers <= 1 or len(slots) < 2:
        for parent, name in slots:
            setattr(parent, name, HalfWeightLinear(getattr(parent, name), scratch, packed))
        return model
    with ThreadPoolExecutor(workers, thread_name_prefix="fermi-prepack") as pool:
        flight: deque[tuple[nn.Module, str, Future[Any]]] = deque()

        landed = itertools.count(1)

        def land() -> None:
            parent, name, future = flight.popleft()
            layer = HalfWeightLinear(getattr(parent, name), scratch, packed, future.result())
            setattr(parent, name, layer)
            if next(landed) % TRIM_EVERY == 0:
                # The fp16 weights just packed were freed into glibc's heaps, where they
                # stay resident while the packs take new pages: hand them back as we go.
                release_free_heap()

        for parent, name in slots:
            flight.append((parent, name, pool.submit(prepack, getattr(parent, name))))
            if len(flight) >= workers:
                land()
        while flight:
            land()
    return model


class HalfEmbedding(nn.Module):
    """An embedding table stored in fp16 whose rows come out in float32.

    A CPU model whose products read fp16 or fewer bits would otherwise keep its table in
    float32, the largest tensor it holds (SmolLM2-135M: 108 MB of its 367, more than its
    int4 layers together). A step gathers one row a token, so the rounding costs nothing
    in time; the values lose what fp16 loses (the head of a tied model is rounded so
    already)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.detach().half(), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


# Tables use_half_embedding stores in fp16: float32, or fp16 already (a GGUF load reads
# the table so when the model stores its weights in fp16).
FLOATS = (torch.float32, torch.float16)


def use_half_embedding(model: nn.Module) -> None:
    """Store ``model``'s token embeddings in fp16 (:class:`HalfEmbedding`; a table already
    in fp16 is taken as it is). A head still tied to the table keeps the tensor (it is read
    whole every step), so the table is halved only when the head has weights of its own
    (``use_half_weights`` packs a copy, quantization builds one)."""
    backbone = model.model
    table = backbone.embed_tokens
    if isinstance(table, HalfEmbedding) or table.weight.dtype not in FLOATS:
        return
    # (Only an nn.Linear can share the tensor; a packed head's ``weight`` would unpack a
    # float32 copy of the whole head just to be compared: +170 MB at SmolLM2's load.)
    head = model.lm_head
    if isinstance(head, nn.Linear) and head.weight is backbone.embed_tokens.weight:
        return
    backbone.embed_tokens = HalfEmbedding(backbone.embed_tokens)
