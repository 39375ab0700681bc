"""Half-precision weight storage for float32 inference on CPU.

Decoding one token reads every weight once, so on CPU it is bound by memory bandwidth:
fp16 weights halve the bytes. Activations and the KV cache stay float32.

Where fermi's own CPU kernels build (``fermi.native``: x86 with AVX2 or AVX-512 and a C
compiler) the weights are stored in their fp16 panels, and every product runs there at
every row count, reading each weight once per 8 rows; a one-row product can take the
layer's RMSNorm, silu(gate) * up and residual add inside it (:meth:`HalfWeightLinear.row`).

Otherwise, on x86 the weights are packed once, at load, for FBGEMM's fp16 matrix product
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

from fermi import native
from fermi.memory import release_free_heap

LAYOUTS = ("native", "fbgemm", "plain")
# Decode steps of up to this many rows run every layer in one call of fermi's kernels
# (fermi.models.decoder.Decoder.use_native_rows).
NATIVE_ROWS = 16
# Without FBGEMM, up to this many rows (tokens x batch) the fp16 matrix-vector path wins.
DIRECT_ROWS = 2
# At most this many threads pack weights at load (see use_half_weights).
PACK_THREADS = 4
# use_half_weights hands the C heap's free pages back after this many packed layers.
TRIM_EVERY = 8


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def best_layout() -> str:
    """The fp16 storage this machine computes fastest from: fermi's kernels, else FBGEMM's
    pack, else a plain fp16 tensor."""
    if native.available():
        return "native"
    return "fbgemm" if fbgemm_available() else "plain"


# Compiled code cannot take the pack (a TorchScript object) as an input: Dynamo refuses it.
# It takes a one-element tensor naming the layer instead (a buffer, so one compiled layer
# serves every layer), and this operator finds the pack by that number.
_PACKED: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()


def register_layer(module: nn.Module) -> torch.Tensor:
    """A one-element tensor naming ``module`` to :func:`packed_fp16_linear` and
    :func:`native_linear` (held weakly: the module's own buffer keeps the name)."""
    number = next(_NUMBERS)
    _PACKED[number] = module
    return torch.tensor([number])


def rename_copied_layer(module: nn.Module) -> None:
    """Give a copy of a registered layer (``copy.deepcopy``, ``copy.copy``, pickle: each
    restores its state through ``__setstate__``) a name of its own: the copied ``_handle``
    names the layer it was copied from, which may be gone (a KeyError in compiled code) or
    hold other weights. The copy gets its own buffer dict, so the original keeps its name."""
    if module._buffers.get("_handle") is not None:
        module._buffers = {**module._buffers, "_handle": register_layer(module)}


class KernelLayer(nn.Module):
    """What :class:`HalfWeightLinear` and ``QuantLinear`` share as layers that compiled
    code names by ``_handle`` and, in fermi's CPU kernels' formats, hand their buffers to
    them through ``native_weight`` (a ``NativeWeight`` that ``_point_native_weight`` builds
    on the buffers as they are)."""

    native_weight: native.NativeWeight | None = None

    def _point_native_weight(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        """With ``native_weight``: a move (``share_memory()``, ``to(device)``) applies, a
        conversion (``model.to(torch.bfloat16)``, ``.half()``) leaves the buffers' dtypes as
        they are (the kernels read their bits: fp16 codes turned bf16 would be other
        numbers), and ``native_weight`` then points at the buffers as they are now (not at
        the tensors they replaced)."""
        if self.native_weight is None:
            return super()._apply(fn, recurse)

        def moved(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        super()._apply(moved, recurse)
        self._point_native_weight()
        return self

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        rename_copied_layer(self)


@torch.library.custom_op("fermi::packed_fp16_linear", mutates_args=())
def packed_fp16_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """The product of float32 ``x`` and the packed weight of the layer ``handle`` names."""
    return torch.ops.quantized.linear_dynamic_fp16(x, _PACKED[int(handle)]._pack)


@packed_fp16_linear.register_fake
def _(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("fermi::native_linear", mutates_args=())
def native_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """The product of float32 ``x`` and the weight, in fermi's kernels, of the layer
    ``handle`` names (fp16 or quantized; what compiled code calls, eager code calls the
    layer). Float32 out."""
    layer = _PACKED[int(handle)]
    assert layer.native_weight is not None
    return layer.native_weight.linear(x)


@native_linear.register_fake
def _(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class HalfWeightLinear(KernelLayer):
    """``nn.Linear`` with an fp16 weight and float32 arithmetic.

    In fermi's blocked layout (``layout="native"``) or packed for FBGEMM (``"fbgemm"``):
    takes float32 inputs (others are converted) and returns float32 at every row count.
    Plain (``"plain"``, without either): returns float32, except for products of
    few rows without a bias, which return the fp16 kernel's output; callers promote it
    (``x + out``) or convert it (``.float()``, ``.to(dtype)``) where they need float32.
    ``weight`` (fp16) and ``bias`` (float32) read the stored values in either case.
    """

    def __init__(
        self,
        linear: nn.Linear,
        scratch: list[torch.Tensor | None],
        layout: str | None = None,
        pack: Any = None,
    ) -> None:
        """``layout``: one of ``LAYOUTS`` (None: :func:`best_layout`); ``pack``: the
        layout's form of the weight (``prepack(linear, layout)``) when the caller made it,
        on another thread."""
        super().__init__()
        self.layout = best_layout() if layout is None else layout
        if self.layout not in LAYOUTS:
            raise ValueError(f"fp16 weight layout {self.layout!r} is not one of {LAYOUTS}")
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.out_features, self.in_features = weight.shape
        # One float32 buffer for the whole model, grown to the largest weight upcast.
        self._scratch = scratch
        if self.layout == "plain":
            self._weight = nn.Parameter(weight.half(), requires_grad=False)
            self._bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            return
        self.register_buffer("_handle", register_layer(self), persistent=False)
        if self.layout == "fbgemm":
            self._pack = prepack(linear, "fbgemm") if pack is None else pack
            return
        blocked = prepack(linear, "native") if pack is None else pack
        self.register_buffer("_blocked", blocked, persistent=False)
        bias = None if bias is None else bias.contiguous()
        self.register_buffer("_native_bias", bias, persistent=False)
        self._point_native_weight()

    def _point_native_weight(self) -> None:
        n, k = self.out_features, self.in_features
        self.native_weight = native.NativeWeight(
            "fp16", n, k, self._blocked, bias=self._native_bias
        )

    @property
    def packed(self) -> bool:
        """Whether the weight is FBGEMM's pack."""
        return self.layout == "fbgemm"

    @property
    def weight(self) -> torch.Tensor:
        if self.layout == "fbgemm":
            return torch.ops.quantized.linear_unpack_fp16(self._pack)[0].half()
        if self.layout == "native":
            return native_unblock(self._blocked, self.out_features, self.in_features)
        return self._weight

    @property
    def bias(self) -> torch.Tensor | None:
        if self.layout == "fbgemm":
            return torch.ops.quantized.linear_unpack_fp16(self._pack)[1]
        if self.layout == "native":
            return self._native_bias
        return self._bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "fbgemm":
            if x.dtype != torch.float32:
                x = x.float()
            if torch.compiler.is_compiling():
                return packed_fp16_linear(x, self._handle, self.out_features)
            return torch.ops.quantized.linear_dynamic_fp16(x, self._pack)
        if self.layout == "native":
            if torch.compiler.is_compiling():
                return native_linear(x.float(), self._handle, self.out_features)
            return self.native_weight.linear(x)
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

    def row(
        self,
        x: torch.Tensor,
        *,
        norm_weight: torch.Tensor | None = None,
        eps: float = 1e-6,
        act: int = 0,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fused one-row product of ``fermi.models.gemv`` (``act`` 1: ``x`` is
        ``[gate | up]`` and the product takes ``silu(gate) * up``; ``norm_weight``: ``x``
        is RMS-normalised first; ``residual`` is added to the result), in one call of
        fermi's kernels. Only the native layout has it."""
        if self.layout != "native":
            raise ValueError(f"row() needs the native layout, not {self.layout!r}")
        return self.native_weight.linear(x, norm_weight, eps, act, residual)

    def _upcast(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        buf = self._scratch[0]
        if buf is None or buf.numel() < n * k:
            buf = torch.empty(n * k, dtype=torch.float32)
            self._scratch[0] = buf
        return buf[: n * k].view(n, k).copy_(self._weight)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, layout={self.layout}"


def native_block(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [n, k] rounded to fp16 in the layout of ``fermi.native``'s kernels:
    panels of 16 output rows, [ceil(n / 16), k, 16], the rows past n zero."""
    panel = native.PANEL
    n, k = weight.shape
    padded = -(-n // panel) * panel
    w16 = F.pad(weight.detach().to(torch.float16), (0, 0, 0, padded - n))
    return w16.view(padded // panel, panel, k).transpose(1, 2).contiguous()


def native_unblock(blocked: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The fp16 weight [n, k] of :func:`native_block`'s layout."""
    panels, _, panel = blocked.shape
    return blocked.transpose(1, 2).reshape(panels * panel, k)[:n].clone()


def prepack(linear: nn.Linear, layout: str = "fbgemm") -> Any:
    """``linear``'s weight in ``layout``: for "fbgemm", FBGEMM's pack (its weight rounded to
    fp16, its bias in float32, in FBGEMM's blocked layout; rounding through ``.half()``
    first makes it the same values as the unpacked path); for "native", the blocked fp16
    tensor of :func:`native_block`. Both release the GIL: packs can be made on several
    threads."""
    if layout == "native":
        return native_block(linear.weight)
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach().float()
    return torch.ops.quantized.linear_prepack_fp16(weight.half().float(), bias)


def use_half_weights(model: nn.Module, layout: str | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of a CPU model (float32, or with its linear weights
    already in fp16) by a :class:`HalfWeightLinear` in ``layout`` (one of ``LAYOUTS``;
    None: :func:`best_layout`).

    A tied ``lm_head`` gets its own fp16 copy: the float32 embedding is only gathered from
    (one row per token), while the head is read whole every step.

    FBGEMM's packing converts one value at a time (SmolLM2-135M's 122 products: ~0.65 s on
    one core of this project's CPU), so packs (either layout's) are made on up to
    ``PACK_THREADS`` of torch's threads, one layer each in flight (``perf/LOG.md`` run
    32): each holds a float32 copy of its weight while it packs, so the load's peak grows
    with the threads, not the model.
    """
    scratch: list[torch.Tensor | None] = [None]
    layout = best_layout() if layout is None else layout
    # Parents and names only: a list that held the nn.Linear modules would keep every float
    # weight alive until the end; each goes as its layer is replaced.
    slots = [
        (parent, name)
        for parent in model.modules()
        if not isinstance(parent, nn.Linear)
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    workers = min(torch.get_num_threads(), PACK_THREADS) if layout != "plain" else 1
    if workers <= 1 or len(slots) < 2:
        for parent, name in slots:
            setattr(parent, name, HalfWeightLinear(getattr(parent, name), scratch, layout))
        return model
    with ThreadPoolExecutor(workers, thread_name_prefix="fermi-prepack") as pool:
        flight: deque[tuple[nn.Module, str, Future[Any]]] = deque()

        landed = itertools.count(1)

        def land() -> None:
            parent, name, future = flight.popleft()
            layer = HalfWeightLinear(getattr(parent, name), scratch, layout, future.result())
            setattr(parent, name, layer)
            if next(landed) % TRIM_EVERY == 0:
                # The fp16 weights just packed were freed into glibc's heaps, where they
                # stay resident while the packs take new pages: hand them back as we go.
                release_free_heap()

        for parent, name in slots:
            flight.append((parent, name, pool.submit(prepack, getattr(parent, name), layout)))
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


def use_half_cache(model: nn.Module) -> None:
    """Keep ``model``'s KV cache in fp16 (``Decoder.cache_dtype``; attention still computes
    in float32): for a CPU model whose weights are stored in 16 bits or fewer, where a long
    context's float32 cache would be read beside them every step (46 KB a token for
    SmolLM2-135M: 73 MB at 1,584 tokens against 94 MB of int4 weights). Each key and value
    is rounded to fp16 once, as llama.cpp's cache stores them; on SmolLM2 that moved
    perplexity by 0.004 and no top-1 token (``perf/LOG.md`` run 74). The CPU
    runners keep a float32 cache after all where fermi's kernels do not run the decode
    step (torch's attention would widen the whole fp16 cache every step)."""
    if model.dtype == torch.float32 and model.device.type == "cpu":
        model.cache_dtype = torch.float16


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
