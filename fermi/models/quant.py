"""Weight-only int8 and int4 linear layers.

A decode step reads every weight once, so its speed follows the bytes of the weights:
int8 halves those of bf16/fp16, int4 (with its scales) takes about a third. Activations
stay in the model's dtype (fermi's CPU kernels round a product's inputs to int16 steps
inside it, below); only the stored weights change.

- **int8**: one scale per output row (symmetric, ``w = q * scale``, q in -127..127).
- **int4**: groups of ``INT4_GROUP`` = 32 consecutive values along the input dimension, each
  with a scale and a minimum (``w = q * scale + min``, q in 0..15). Why 32: llama.cpp's 4-bit
  formats (Q4_0, Q4_1, Q4_K) use groups of 32, so their codes load unchanged
  (``fermi.gguf``), while re-quantizing them into coarser groups costs a lot (SmolLM2's Q4_1
  values in groups of 64: perplexity 31.5 -> 47.0, perf/results/cpu_quant_quality.json);
  SmolLM2's hidden size 576 is no multiple of 128; and the finest groups of the range lose
  least. The cost: 5 bits a weight instead of 4.25 with groups of 128, and on this CPU
  torch's kernel ran groups of 64 faster (perf/results/cpu_quant_kernels.json).
  ``QuantSpec(group=64)`` or ``128`` takes the others.

:class:`QuantizedWeight` is the stored form, the same on every device: int8 codes [N, K], or
int4 codes packed two to a byte [N, K/2] in llama.cpp's order (in each group, byte j holds
value j in its low nibble and value j + 16 in its high one), with float32 scales (and
minimums). :class:`QuantLinear` turns it into what its device's kernel reads:

- CPU, where fermi's own kernels build (``fermi.native``, layout ``"native"``): the codes
  in their panels of 16 output rows, int4 scales and minimums in fp16 (as the CUDA kernels
  read them), int8 scales in float32; the weights are never formed. The inputs are rounded
  to int16 in blocks of each row (int4: its groups; int8: 32 features), a block's step its
  largest magnitude / 32767, so that a block's sum of codes times inputs is an exact
  integer sum, then scaled (:func:`rounded_inputs` is that rounding in torch; int4's
  minimums multiply the block's unrounded sum). Decode steps run every layer there in one
  call (``Decoder.use_native_rows``).
- CPU otherwise (layout ``"torch"``): torch's packed-weight kernels
  (``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``). They are fast only
  with bf16 activations (float32 takes a scalar path ~10-30x slower,
  perf/results/cpu_quant_kernels.json), so the input is cast to bf16 and the output back to
  the input's dtype.
- CUDA: the fused one-row Triton kernels of ``fermi.models.gemv`` for batch-1 decode, the
  few-row kernel of ``fermi.models.quant_mm`` up to 16 rows, and dequantize +
  matmul (cuBLAS) above that (prefill).
- elsewhere: dequantize + matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fermi import native
from fermi.models import gemv, quant_mm
from fermi.models.gemv import ACT_NONE, ACT_SILU_MUL
from fermi.models.half_weights import KernelLayer, native_linear, register_layer

SCHEMES = ("int8", "int4")
INT4_GROUP = 32
INT4_GROUPS = (32, 64, 128)  # the group sizes the kernels take (torch's CPU kernel: 32..256)


def check_scheme(scheme: str | None) -> str | None:
    """``scheme`` when it is None or one of :data:`SCHEMES`, else a ValueError naming them."""
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(
            f"quantize={scheme!r} is not supported; choose one of {', '.join(SCHEMES)} "
            "(or leave it unset for the checkpoint's own precision)"
        )
    return scheme


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight in its stored form (see the module's docstring)."""

    codes: torch.Tensor  # int8 [N, K], or uint8 [N, K/2] for int4
    scales: torch.Tensor  # float32: [N] for int8, [N, K/group] for int4
    mins: torch.Tensor | None = None  # int4: float32 [N, K/group]

    @property
    def scheme(self) -> str:
        return "int8" if self.codes.dtype == torch.int8 else "int4"

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return (n, k if self.scheme == "int8" else 2 * k)

    @property
    def group_size(self) -> int:
        return self.shape[1] if self.scheme == "int8" else self.shape[1] // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.mins)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scheme == "int8":
            return (self.codes.float() * self.scales.float()[:, None]).to(dtype)
        assert self.mins is not None
        n, k = self.shape
        g = self.group_size
        q = unpack_int4(self.codes, g).float().view(n, k // g, g)
        w = q * self.scales.float()[..., None] + self.mins.float()[..., None]
        return w.view(n, k).to(dtype)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Rows ``start:stop`` of the weight (views of its codes, scales and minimums)."""
        return self.map_rows(lambda t: t[start:stop])

    def map_rows(self, fn) -> QuantizedWeight:
        """The weight with ``fn`` (a reordering of rows, such as llama.cpp's q/k permutation
        undone) applied to the rows of its codes, scales and minimums alike."""
        mins = None if self.mins is None else fn(self.mins)
        return QuantizedWeight(fn(self.codes), fn(self.scales), mins)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        mins = None if self.mins is None else self.mins.to(device)
        return QuantizedWeight(self.codes.to(device), self.scales.to(device), mins)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """The weights stacked by rows (a fused projection from its parts)."""
        if len(parts) == 1:
            return parts[0]
        kinds = {(p.scheme, p.shape[1], p.group_size) for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot stack quantized weights of different kinds: {kinds}")
        mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
        return QuantizedWeight(
            torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins
        )


def pack_int4(q: torch.Tensor, group: int) -> torch.Tensor:
    """Codes 0..15 [N, K] -> [N, K/2] uint8: in each group, value j in the low nibble of
    byte j and value j + group/2 in its high nibble (llama.cpp's Q4_0/Q4_1 order)."""
    n, k = q.shape
    q = q.to(torch.uint8).view(n, k // group, 2, group // 2)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(codes: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: [N, K/2] uint8 -> codes 0..15 [N, K] (uint8)."""
    n, half = codes.shape
    c = codes.view(n, half * 2 // group, group // 2)
    return torch.stack((c & 0xF, c >> 4), dim=2).reshape(n, 2 * half)


def cpu_layout() -> str:
    """How :class:`QuantLinear` holds its weight on this machine's CPU: ``"native"`` where
    fermi's kernels load, else ``"torch"``."""
    return "native" if native.available() else "torch"


def _panels(t: torch.Tensor) -> torch.Tensor:
    """[n, c] -> [ceil(n/16), c, 16]: rows in panels of ``native.PANEL``, zero-padded."""
    panel = native.PANEL
    n, c = t.shape
    padded = -(-n // panel) * panel
    if padded != n:
        t = torch.cat([t, t.new_zeros(padded - n, c)])
    return t.view(padded // panel, panel, c).transpose(1, 2).contiguous()


def _unpanel(t: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`_panels`: [P, c, 16] -> [n, c]."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


def native_pack(w: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``w`` in the panels of ``fermi.native``'s int8 or int4 format (kernels.c): codes,
    scales (int8: float32 per row; int4: fp16 per group) and int4 minimums (fp16)."""
    if w.scheme == "int8":
        scales = _panels(w.scales.float()[:, None]).view(-1)
        q = _panels(w.codes)  # [P, k, 16]
        p, k = q.shape[:2]
        q = torch.cat([q, q.new_zeros(p, k % 2, native.PANEL)], dim=1)
        # features 2j, 2j + 1 of row r at bytes 2r, 2r + 1 of step j
        codes = q.view(p, -1, 2, native.PANEL).transpose(2, 3).reshape(p, -1, 2 * native.PANEL)
        return codes.contiguous(), scales, None
    assert w.mins is not None
    q = _panels(unpack_int4(w.codes, w.group_size))  # [P, k, 16], one code a byte
    p, k = q.shape[:2]
    # feature 8j + 4h + 2s + t: half h of step j, byte 2r + t, low nibble (s = 0) or high
    q = q.view(p, k // 8, 2, 2, 2, native.PANEL)
    codes = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(3, 4)
    return (
        codes.reshape(p, k // 8, 4 * native.PANEL).contiguous(),
        _panels(w.scales.half()),
        _panels(w.mins.half()),
    )


# Input features per block that the native int8 product rounds together (kernels.c).
INT8_BLOCK = 32


def rounded_inputs(x: torch.Tensor, block: int) -> torch.Tensor:
    """The inputs ``x`` [..., K] (float32) as the native int8 and int4 products multiply
    them with the codes: each block of ``block`` values (int4: its group; int8:
    ``INT8_BLOCK``, the last block shorter) rounded to int16 steps of its largest magnitude
    / 32767 (ties to even), then scaled back. (int4's minimums multiply the unrounded sum.)
    A block below 2^-64 is scaled up by 2^64 first (exactly), so that 32767 / its largest
    magnitude stays finite; a block with a NaN or an infinity is NaN."""
    k = x.shape[-1]
    pad = -k % block
    g = F.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], (k + pad) // block, block)
    top = g.abs().amax(-1, keepdim=True)
    up = torch.where(top < 2.0**-64, 2.0**64, 1.0)
    # (a true division, as kernels.c's: torch's scalar / tensor multiplies by a reciprocal)
    inv = torch.where(top > 0, torch.full_like(top, 32767.0) / (top * up), torch.zeros_like(top))
    step = torch.where(torch.isfinite(g).all(-1, keepdim=True), top / 32767.0, float("nan"))
    rounded = (torch.round(g * up * inv) * step).reshape(*x.shape[:-1], k + pad)
    return rounded[..., :k]


def native_unpack(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    n: int,
    k: int,
    group: int,
) -> QuantizedWeight:
    """The :class:`QuantizedWeight` of :func:`native_pack`'s tensors (``n`` output rows,
    ``k`` input features)."""
    p, steps = codes.shape[:2]
    if mins is None:
        q = codes.view(p, steps, native.PANEL, 2).transpose(2, 3).reshape(p, steps * 2, -1)
        return QuantizedWeight(_unpanel(q[:, :k], n).contiguous(), scales[:n].clone())
    pairs = codes.view(p, steps, 2, native.PANEL, 2).transpose(3, 4)  # [P, k/8, h, t, r]
    q = torch.stack((pairs & 0xF, pairs >> 4), dim=3)  # [P, k/8, h, s, t, r]
    q = _unpanel(q.reshape(p, steps * 8, native.PANEL), n)
    return QuantizedWeight(
        pack_int4(q, group), _unpanel(scales, n).float(), _unpanel(mins, n).float()
    )


# Rows quantized (or compared) at a time: every step is per row, so blocks give the same
# values as the whole matrix, with float32 temporaries of one block instead of several of
# the matrix (a 49,152-row tied head quantized from its float32 table took ~340 MB more at
# once: perf/LOG.md run 53).
BLOCK_ROWS = 1024


def _row_blocks(n: int) -> range:
    return range(0, n, BLOCK_ROWS)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8, one scale per output row: the row's largest magnitude maps to 127."""
    n = weight.shape[0]
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=torch.float32, device=weight.device)
    for r in _row_blocks(n):
        w = weight[r : r + BLOCK_ROWS].float()
        s = w.abs().amax(dim=1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes[r : r + BLOCK_ROWS] = torch.round(w / s[:, None]).clamp(-127, 127)
        scales[r : r + BLOCK_ROWS] = s
    return QuantizedWeight(codes, scales)


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> QuantizedWeight:
    """Asymmetric int4 per group of ``group`` values along K: the group's minimum maps to
    code 0 and its maximum to 15 (llama.cpp's Q4_1 rule). Scales and minimums are rounded to
    fp16 first (as Q4_1 stores them, and the CUDA kernels read them), and the codes chosen
    for the rounded values."""
    n, k = weight.shape
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {group}")
    if k % group:
        raise ValueError(f"int4 with groups of {group} needs K divisible by {group}, got {k}")
    device = weight.device
    codes = torch.empty((n, k // 2), dtype=torch.uint8, device=device)
    scales = torch.empty((n, k // group), dtype=torch.float32, device=device)
    mins = torch.empty((n, k // group), dtype=torch.float32, device=device)
    for r in _row_blocks(n):
        w = weight[r : r + BLOCK_ROWS].float()
        w = w.view(w.shape[0], k // group, group)
        low, high = w.amin(dim=2), w.amax(dim=2)
        s = ((high - low) / 15.0).half().float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        m = low.half().float()
        q = torch.round((w - m[..., None]) / s[..., None]).clamp(0, 15)
        codes[r : r + BLOCK_ROWS] = pack_int4(q.view(-1, k), group)
        scales[r : r + BLOCK_ROWS] = s
        mins[r : r + BLOCK_ROWS] = m
    return QuantizedWeight(codes, scales, mins)


def quantize(weight: torch.Tensor, scheme: str, group: int = INT4_GROUP) -> QuantizedWeight:
    if scheme == "int8":
        return quantize_int8(weight)
    if scheme == "int4":
        return quantize_int4(weight, group)
    raise ValueError(f"quantization scheme {scheme!r} is not one of {', '.join(SCHEMES)}")


def relative_error(q: QuantizedWeight, reference: torch.Tensor) -> float:
    """||dequantize(q) - reference|| / ||reference|| (Frobenius): what quantizing cost.
    Summed by blocks of rows, so no float copy of the whole matrix is made."""
    num = den = 0.0
    for r in _row_blocks(reference.shape[0]):
        ref = reference[r : r + BLOCK_ROWS].float()
        rows = q.rows(r, r + BLOCK_ROWS).dequantize(torch.float32).to(ref.device)
        num += float(torch.linalg.vector_norm(rows.sub_(ref))) ** 2
        den += float(torch.linalg.vector_norm(ref)) ** 2
    return (num / max(den, 1e-60)) ** 0.5


class QuantLinear(KernelLayer):
    """A linear layer with a :class:`QuantizedWeight`, held in the form its device's kernel
    reads (see the module's docstring). Returns the input's dtype."""

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        device: torch.device | str,
        dtype: torch.dtype,
        layout: str | None = None,
    ) -> None:
        """``layout`` (CPU only): ``"native"`` or ``"torch"``; None: :func:`cpu_layout`."""
        super().__init__()
        device = torch.device(device)
        self.scheme = weight.scheme
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype), False)
        self.cpu = device.type == "cpu"
        # CPU: "native" (fermi's kernels) or "torch" (cpu_layout); elsewhere the device's.
        self.layout = (layout or cpu_layout()) if self.cpu else device.type
        if self.cpu and self.layout not in ("native", "torch"):
            raise ValueError(f"CPU layout {self.layout!r} is not 'native' or 'torch'")
        if self.layout == "native" and not native.available():
            raise ValueError("layout 'native' needs fermi's CPU kernels, which do not load here")
        w = weight.to(device)
        if self.layout == "native":
            codes, scales, mins = native_pack(w)
            self.register_buffer("codes", codes, False)
            self.register_buffer("scales", scales, False)
            self.register_buffer("mins", mins, False)
            fbias = None if bias is None else bias.detach().float().contiguous()
            self.register_buffer("_native_bias", fbias, False)
            self.register_buffer("_handle", register_layer(self), False)
            self._point_native_weight()
        elif self.cpu and self.scheme == "int8":
            self.register_buffer("codes", w.codes.contiguous(), False)
            # torch's kernel takes the scales in the activations' dtype (bf16).
            self.register_buffer("scales", w.scales.to(torch.bfloat16), False)
            self.register_buffer("mins", None, False)
        elif self.cpu:  # torch's tile-packed int4 with (scale, zero) pairs, q - 8 centred
            assert w.mins is not None
            q = unpack_int4(w.codes, self.group_size).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            zeros = w.mins + 8.0 * w.scales
            pairs = torch.stack((w.scales.t(), zeros.t()), dim=-1).contiguous()
            self.register_buffer("codes", packed, False)
            self.register_buffer("scales", pairs.to(torch.bfloat16), False)
            self.register_buffer("mins", None, False)
        else:
            # int4 scales and minimums in fp16: 4 bytes for every 16 bytes of codes.
            scale_dtype = torch.float32 if self.scheme == "int8" else torch.float16
            self.register_buffer("codes", w.codes.contiguous(), False)
            self.register_buffer("scales", w.scales.to(scale_dtype).contiguous(), False)
            mins = None if w.mins is None else w.mins.to(torch.float16).contiguous()
            self.register_buffer("mins", mins, False)

    def _point_native_weight(self) -> None:
        group = self.group_size if self.scheme == "int4" else 0
        n, k = self.out_features, self.in_features
        self.native_weight = native.NativeWeight(
            self.scheme, n, k, self.codes, self.scales, self.mins, group, self._native_bias
        )

    def extra_repr(self) -> str:
        group = f", group={self.group_size}" if self.scheme == "int4" else ""
        return f"{self.in_features} -> {self.out_features}, {self.scheme}{group}"

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.mins)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def weight_as_stored(self) -> QuantizedWeight:
        """The :class:`QuantizedWeight` this layer computes with, in the stored form (CPU's
        packing undone): the reference the kernels are tested against."""
        if self.layout == "native":
            n, k = self.out_features, self.in_features
            return native_unpack(self.codes, self.scales, self.mins, n, k, self.group_size)
        if not self.cpu:
            mins = None if self.mins is None else self.mins.float()
            return QuantizedWeight(self.codes, self.scales.float(), mins)
        if self.scheme == "int8":
            return QuantizedWeight(self.codes, self.scales.float())
        n, k, g = self.out_features, self.in_features, self.group_size
        eye = torch.eye(k, dtype=torch.bfloat16)
        # The packed layout is torch's own: read the codes back through the kernel itself,
        # with unit scales and zeros at 8 (so it returns q).
        unit = torch.zeros(k // g, n, 2, dtype=torch.bfloat16)
        unit[..., 0], unit[..., 1] = 1.0, 8.0
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.codes, g, unit)
        q = q.t().round().to(torch.uint8)
        scales = self.scales[..., 0].t().float()
        mins = self.scales[..., 1].t().float() - 8.0 * scales
        return QuantizedWeight(pack_int4(q, g), scales.contiguous(), mins.contiguous())

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_as_stored().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_weight is not None:
            if torch.compiler.is_compiling():
                y = native_linear(x.float(), self._handle, self.out_features)
            else:
                y = self.native_weight.linear(x)
            return y.to(x.dtype)
        if self.cpu:
            return self._cpu(x)
        if x.is_cuda and quant_mm.triton is not None:
            return quant_mm.quant_linear(x, self.codes, self.scales, self.mins, self.bias)
        w = self.weight_as_stored().dequantize(x.dtype)
        return F.linear(x, w, self.bias)

    def _cpu(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.scheme == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.codes, self.group_size, self.scales
            )
        y = y.view(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def row(
        self,
        x: torch.Tensor,
        *,
        norm_weight: torch.Tensor | None = None,
        eps: float = 1e-6,
        act: int = ACT_NONE,
        residual: torch.Tensor | None = None,
        pdl: bool = False,
    ) -> torch.Tensor:
        """The fused one-row product of ``fermi.models.gemv`` with this layer's weights:
        the Triton kernel on CUDA (``pdl``: launched with PDL), the same steps in torch
        elsewhere."""
        gemv._check_one_row(x)
        if self.native_weight is not None:
            y = self.native_weight.linear(x, norm_weight, eps, act, residual)
            return y.to(x.dtype)
        if x.is_cuda and gemv.triton is not None:
            fused = {
                "norm_weight": norm_weight, "eps": eps, "act": act, "residual": residual, "pdl": pdl
            }  # fmt: skip
            if self.scheme == "int8":
                return gemv.gemv(x, self.codes, self.bias, scale=self.scales, **fused)
            return gemv.gemv_int4(x, self.codes, self.scales, self.mins, self.bias, **fused)
        if act == ACT_SILU_MUL:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        if norm_weight is not None:
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            x = norm_weight * h.to(x.dtype)
        y = self(x)
        return y if residual is None else residual + y


# The lm_head is quantized to int8 under both schemes: it is about a fifth of the bytes
# a small model reads per token (SmolLM2-135M 21%, Qwen3-1.7B 18%), and int4 there costs
# more quality than in the layers (perf/results/cpu_quant_quality.json). Embeddings stay in
# float: a step gathers one row of them, so quantizing them would save memory, not time.
HEAD_SCHEME = "int8"


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize: the decoder layers' projections in ``scheme`` (int4 in groups of
    ``group``) and the ``lm_head`` in ``head`` (None keeps it in float)."""

    scheme: str
    group: int = INT4_GROUP
    head: str | None = HEAD_SCHEME

    @staticmethod
    def parse(value: str | QuantSpec | None) -> QuantSpec | None:
        if value is None or isinstance(value, QuantSpec):
            return value
        return QuantSpec(str(check_scheme(value)))

    def targets(self, num_layers: int) -> dict[str, str]:
        """Module name -> scheme for every linear layer this spec quantizes."""
        out = {
            f"model.layers.{i}.{name}": self.scheme
            for i in range(num_layers)
            for name in (
                "self_attn.qkv_proj",
                "self_attn.o_proj",
                "mlp.gate_up_proj",
                "mlp.down_proj",
            )
        }
        if self.head is not None:
            out["lm_head"] = self.head
        return out

    @property
    def label(self) -> str:
        group = f"-g{self.group}" if self.scheme == "int4" else ""
        head = f", lm_head {self.head or 'float'}"
        return f"{self.scheme}{group}{head}"

    def nbytes(self, scheme: str, n: int, k: int) -> int:
        """Bytes a quantized [n, k] weight takes (codes and scales)."""
        if scheme == "int8":
            return n * k + 4 * n
        return n * k // 2 + 4 * n * k // self.group


@dataclass
class QuantReport:
    """What loading quantized: the layers whose stored codes were kept as they are, and the
    relative error (:func:`relative_error`) of every layer quantized from float values."""

    spec: QuantSpec
    kept: list[str]
    errors: dict[str, float]
    nbytes: int
    # Kept layers whose scales (or minimums) the device holds rounded (Q4_K's d * scale is
    # no fp16 value): the relative error that rounding adds.
    rounded: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"quantized {len(self.kept) + len(self.errors)} linear layers ({self.spec.label})"]
        if self.kept:
            parts.append(f"{len(self.kept)} kept their stored codes")
        if self.rounded:
            worst = max(self.rounded.values())
            parts.append(
                f"{len(self.rounded)} of them with scales rounded to the kernels' precision: "
                f"relative error max {100 * worst:.3f}%"
            )
        if self.errors:
            worst = max(self.errors, key=self.errors.__getitem__)
            mean = sum(self.errors.values()) / len(self.errors)
            parts.append(
                f"{len(self.errors)} quantized from float values: relative error mean "
                f"{100 * mean:.2f}%, max {100 * self.errors[worst]:.2f}% ({worst})"
            )
        return "; ".join(parts)


def build_linear(
    parts: list[torch.Tensor | QuantizedWeight],
    scheme: str,
    spec: QuantSpec,
    bias: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[QuantLinear, float | None, float]:
    """A :class:`QuantLinear` of the rows of ``parts`` stacked; the relative error of the
    quantization, or None when every part came already quantized in ``scheme`` (kept); and
    for kept codes, the relative error of their scales as the device holds them (0.0 when
    they are held exactly, as Q4_0/Q4_1's fp16 scales are)."""
    kept = all(isinstance(p, QuantizedWeight) and p.scheme == scheme for p in parts)
    if kept and scheme == "int4":
        kept = all(p.group_size == spec.group for p in parts)  # type: ignore[union-attr]
    if kept:
        weight = QuantizedWeight.cat(parts)  # type: ignore[arg-type]
        layer = QuantLinear(weight, bias, device, dtype)
        held = device_precision(weight, device)
        exact = torch.equal(held.scales.cpu(), weight.scales.float().cpu()) and (
            weight.mins is None or torch.equal(held.mins.cpu(), weight.mins.float().cpu())
        )
        rounding = 0.0 if exact else relative_error(held, weight.dequantize(torch.float32))
        return layer, None, rounding
    floats = [
        p.dequantize(torch.float32).to(device) if isinstance(p, QuantizedWeight) else p.to(device)
        for p in parts
    ]
    full = floats[0] if len(floats) == 1 else torch.cat(floats)
    weight = quantize(full, scheme, spec.group)
    layer = QuantLinear(weight, bias, device, dtype)
    return layer, relative_error(device_precision(weight, device), full), 0.0


def device_precision(
    weight: QuantizedWeight, device: torch.device | str, layout: str | None = None
) -> QuantizedWeight:
    """``weight`` with its scales (and minimums) rounded as :class:`QuantLinear` holds them
    on ``device`` (on CPU in ``layout``, None: :func:`cpu_layout`): what its kernels compute
    with."""
    cpu = torch.device(device).type == "cpu"
    if cpu and (layout or cpu_layout()) == "native":  # int8 scales as they are, int4's fp16
        cpu = False
    if weight.scheme == "int8":
        scales = weight.scales.to(torch.bfloat16).float() if cpu else weight.scales.float()
        return QuantizedWeight(weight.codes, scales)
    assert weight.mins is not None
    if cpu:  # torch's kernel: (q - 8) * scale + zero, both in bf16
        scales = weight.scales.to(torch.bfloat16).float()
        zeros = (weight.mins + 8.0 * weight.scales).to(torch.bfloat16).float()
        return QuantizedWeight(weight.codes, scales, zeros - 8.0 * scales)
    return QuantizedWeight(weight.codes, weight.scales.half().float(), weight.mins.half().float())


def quantize_decoder(model: nn.Module, spec: QuantSpec) -> QuantReport:
    """Quantize, in place, the linear layers ``spec`` names in a float ``Decoder`` already
    built (benchmarks build random ones; the loaders quantize while they load, through
    ``fermi.loading.build_model``). Sets and returns ``model.quantization``."""
    report = QuantReport(spec, [], {}, 0)
    for name, scheme in spec.targets(model.cfg.num_hidden_layers).items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not a float nn.Linear")
        layer, error, _ = build_linear(
            [linear.weight.detach()], scheme, spec, linear.bias, model.device, model.dtype
        )
        model.set_submodule(name, layer)
        report.errors[name] = error or 0.0
        report.nbytes += layer.nbytes
    if model.device.type == "cpu":  # as the loaders store it (fermi.models.half_weights)
        from fermi.models.half_weights import use_half_cache, use_half_embedding

        use_half_embedding(model)
        use_half_cache(model)
    model.quantization = report
    return report
