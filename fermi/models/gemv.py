"""One-row products for CUDA decode: a Triton GEMV with the layer's small ops folded in.

At batch 1 a decode step is a chain of matrix-vector products, each reading a weight matrix
once, with small kernels between them (RMSNorm, SiLU x up, the residual add, cuBLAS's
split-K reduce). Each of those costs a launch of ~1.5 us for a few kilobytes of work. Here one
program owns ``BLOCK_N`` output rows: it streams their weights once, ``BLOCK_K`` columns at a
time, and computes its own copy of the input vector on the way in:

- ``norm_weight``: the input is RMS-normalised first. The norm's scale is one number per
  row, so each program sums the squares of the input as it streams it and divides its
  sums at the end: one pass, no wait for the norm before the weights start streaming;
- ``act=1``: the input is ``[gate | up]`` (2K values) and the product takes
  ``silu(gate) * up``;
- ``bias`` and ``residual`` are added to the result.

The weights may be float, int8 with one scale per row (``scale``: the sums are scaled at the
end), or int4 in groups (``gemv_int4``: the codes of ``fermi.models.quant``, two to a byte,
with a scale and a minimum per group; each group's sum is ``scale * sum(q * x) + min *
sum(x)``, so no float weight is formed).

silu(gate) * up is rounded to the activation dtype where the unfused torch ops round it;
the normalised input is not rounded (the unfused RMSNorm rounds it once, before the
product), so in bf16 the two differ by about one rounding of the input.

Registered with ``torch.library.triton_op`` (traced by ``torch.compile``, captured in CUDA
graphs). Importing this module needs Triton for the kernel; ``gemv_reference`` is the
same computation in torch, for tests and for devices without Triton.
"""

# ruff: noqa: N803 (Triton style: pointer and constexpr arguments in capitals)
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

# Triton serves CUDA only: a process without CUDA skips its import (~0.15-0.2 s of a CPU
# start), unless the kernels are to run under Triton's interpreter (TRITON_INTERPRET=1, as
# tests/test_quant.py runs them on CPU).
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton
        import triton.language as tl
        from torch.library import triton_op, wrap_triton
    except ImportError:  # CPU-only installs
        triton = None
else:
    triton = None

ACT_NONE, ACT_SILU_MUL = 0, 1


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def pdl_wanted(device: torch.device) -> bool:
    """Whether the one-row products on ``device`` should use programmatic dependent launch:
    ``FERMI_PDL=1`` and a GPU of compute capability 9.0 or later (Hopper). Off by default
    until it is measured in the whole decode step (perf/pdl_ab.sh).

    A decode step at batch 1 is a chain of short kernels; with PDL each product's programs
    become resident while the previous kernel drains, read their first tile of weights
    (which no earlier kernel writes), and only then wait (``griddepcontrol.wait``) for the
    previous kernel's output, letting their own dependants launch at once. On an H100 this
    took a chain of Qwen3-0.6B's products from 21.4 to 16.4 us a layer (perf/LOG.md run 80).
    """
    value = os.environ.get("FERMI_PDL", "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"FERMI_PDL must be 0 or 1, got {value!r}")
    if value == "0" or not available() or device.type != "cuda" or torch.version.hip:
        return False  # (ROCm's GPUs report capabilities of 9 too: no griddepcontrol there)
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_config(n: int, k: int, itemsize: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight: four rows a program
    (many programs in flight for every Qwen3 shape), columns in blocks that divide K; chosen
    from a sweep on an H100 (perf/LOG.md) for 2-byte weights. One-byte (int8) weights, from
    the H200 sweep of ``perf/micro_gemv_quant.py`` over Qwen3-1.7B's and 8B's products (LOG
    run 64; within 5% of each product's best there): two rows and 2,048 columns a program
    for the long down products, two rows and 1,024 columns where fewer than 4,096 outputs
    would leave too few programs, else four rows and 512 columns."""
    if itemsize == 1:
        if k > 4096 and k % 2048 == 0:
            return 2, 2048, 4, 1
        if n < 4096 and k % 1024 == 0:
            return 2, 1024, 4, 1
        if k % 512 == 0:
            return 4, 512, 4, 1
    if k % 1024 == 0:
        return 4, 1024, 8, 1
    if k >= 512:
        return 4, 512, 4, 1
    return 4, max(16, 1 << (k - 1).bit_length()), 4, 1


def launch_config_int4(n: int, k: int, group: int) -> tuple[int, int, int, int]:
    """The int4 kernel's (BLOCK_N, BLOCK_K, num_warps, num_stages): BLOCK_K values (half as
    many bytes) a step, a power of two and a multiple of ``group``; eight rows a program,
    two below 4,096 outputs (more programs); 4 warps, one stage. From the H200 sweep of
    ``perf/micro_gemv_quant.py`` (LOG run 64): within 5% of each Qwen3-1.7B / 8B product's
    best."""
    for block_k in (4096, 2048, 1024, 512):
        if k % block_k == 0:
            return (8 if n >= 4096 else 2), block_k, 4, 1
    return 4, max(group, min(512, 1 << (k - 1).bit_length())), 4, 1


if triton is not None:

    @triton.jit
    def _row_input(X, NW, cols, col_ok, K, NORM: tl.constexpr, ACT: tl.constexpr):
        """The input at ``cols`` as the product takes it (silu(gate) * up with ``ACT``, times
        the norm weight with ``NORM``) and the squares of the values before the norm."""
        dt = X.dtype.element_ty
        if ACT == 1:  # silu(gate) * up, each rounded as the torch ops round them
            gate = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
            up = tl.load(X + K + cols, mask=col_ok, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
            x = (silu * up).to(dt).to(tl.float32)
        else:
            x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
        squares = x * x
        if NORM:  # RMSNorm's scale is one number: applied to the sums at the end
            x = x * tl.load(NW + cols, mask=col_ok, other=0.0).to(tl.float32)
        return x, squares

    @triton.jit
    def _row_output(
        y, squares, rows, row_ok, Y, B, R, S, K, eps,
        NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
    ):  # fmt: skip
        """Finish the sums ``y`` of ``rows``: the per-row weight scale, the norm, the bias and
        the residual; store them."""
        dt = Y.dtype.element_ty
        if HAS_SCALE:  # int8 weights: one scale per output row
            y = y * tl.load(S + rows, mask=row_ok, other=0.0).to(tl.float32)
        if NORM:
            y = y / tl.sqrt(squares / K + eps)
        if HAS_BIAS:
            y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_RES:  # the product is rounded before the residual add, as two ops would
            y = y.to(dt).to(tl.float32) + tl.load(R + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(dt), mask=row_ok)

    @triton.jit
    def _gemv_kernel(
        X, W, Y, B, NW, R, S,
        N, K, stride_w, eps,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        NORM: tl.constexpr,
        ACT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        squares = tl.zeros([BLOCK_K], tl.float32)
        if PDL:  # the first tile of weights, which no earlier kernel writes, before the wait
            first_ok = cols0 < K
            w = tl.load(
                W + rows[:, None] * stride_w + cols0[None, :],
                mask=row_ok[:, None] & first_ok[None, :],
                other=0.0,
            )
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
            x, squares = _row_input(X, NW, cols0, first_ok, K, NORM, ACT)
            acc += w.to(tl.float32) * x[None, :]
        for k0 in range(PDL * BLOCK_K, K, BLOCK_K):  # (without PDL: from 0)
            cols = k0 + cols0
            col_ok = cols < K
            x, sq = _row_input(X, NW, cols, col_ok, K, NORM, ACT)
            squares += sq
            w = tl.load(
                W + rows[:, None] * stride_w + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += w.to(tl.float32) * x[None, :]
        _row_output(
            tl.sum(acc, 1), tl.sum(squares, 0), rows, row_ok, Y, B, R, S, K, eps,
            NORM, HAS_BIAS, HAS_RES, HAS_SCALE,
        )  # fmt: skip

    @triton.jit
    def _int4_step(
        codes, k0, rows, row_ok, byte, lo_cols0, X, C, NW, SC, MN, K, stride_c, stride_s,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        NORM: tl.constexpr, ACT: tl.constexpr, LOADED: tl.constexpr,
    ):  # fmt: skip
        """One BLOCK_K-value step of the int4 kernel: its [BLOCK_N, groups] sums and the
        squares of its inputs. The step's codes are read after its inputs, unless
        ``LOADED`` (then ``codes`` holds them)."""
        HALF: tl.constexpr = GROUP // 2
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        lo_cols = k0 + lo_cols0
        col_ok = lo_cols < K  # K is a multiple of GROUP: a group is in or out whole
        x_lo, sq_lo = _row_input(X, NW, lo_cols, col_ok, K, NORM, ACT)
        x_hi, sq_hi = _row_input(X, NW, lo_cols + HALF, col_ok, K, NORM, ACT)
        squares = sq_lo + sq_hi
        if not LOADED:
            codes = tl.load(
                C + rows[:, None] * stride_c + (k0 // 2 + byte)[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0,
            )
        lo = (codes & 0xF).to(tl.float32)
        hi = (codes >> 4).to(tl.float32)
        dots = lo * x_lo[None, :] + hi * x_hi[None, :]
        dots = tl.sum(tl.reshape(dots, (BLOCK_N, GROUPS, HALF)), 2)
        sums = tl.sum(tl.reshape(x_lo + x_hi, (GROUPS, HALF)), 1)
        groups = k0 // GROUP + tl.arange(0, GROUPS)
        at = rows[:, None] * stride_s + groups[None, :]
        ok = row_ok[:, None] & (groups < K // GROUP)[None, :]
        scale = tl.load(SC + at, mask=ok, other=0.0).to(tl.float32)
        low = tl.load(MN + at, mask=ok, other=0.0).to(tl.float32)
        return dots * scale + low * sums[None, :], squares

    @triton.jit
    def _gemv_int4_kernel(
        X, C, SC, MN, Y, B, NW, R,
        N, K, stride_c, stride_s, eps,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        NORM: tl.constexpr,
        ACT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        # Codes in fermi.models.quant's layout: in each group of GROUP values, byte j holds
        # value j in its low nibble and value j + GROUP/2 in its high one; w = q * scale + min.
        # Per group: scale * sum(q * x) + min * sum(x), so the weights are never formed.
        HALF: tl.constexpr = GROUP // 2
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        byte = tl.arange(0, BLOCK_K // 2)
        lo_cols0 = (byte // HALF) * GROUP + byte % HALF
        acc = tl.zeros([BLOCK_N, GROUPS], tl.float32)
        squares = tl.zeros([BLOCK_K // 2], tl.float32)
        codes = tl.zeros([BLOCK_N, BLOCK_K // 2], tl.uint8)
        if PDL:  # the first step's codes before the wait (see _gemv_kernel)
            codes = tl.load(
                C + rows[:, None] * stride_c + byte[None, :],
                mask=row_ok[:, None] & (lo_cols0 < K)[None, :],
                other=0,
            )
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
            acc, squares = _int4_step(
                codes, 0, rows, row_ok, byte, lo_cols0, X, C, NW, SC, MN, K, stride_c, stride_s,
                GROUP, BLOCK_N, BLOCK_K, NORM, ACT, True,
            )  # fmt: skip
        for k0 in range(PDL * BLOCK_K, K, BLOCK_K):  # (without PDL: from 0)
            step, sq = _int4_step(
                codes, k0, rows, row_ok, byte, lo_cols0, X, C, NW, SC, MN, K, stride_c, stride_s,
                GROUP, BLOCK_N, BLOCK_K, NORM, ACT, False,
            )  # fmt: skip
            acc += step
            squares += sq
        _row_output(
            tl.sum(acc, 1), tl.sum(squares, 0), rows, row_ok, Y, B, R, R, K, eps,
            NORM, HAS_BIAS, HAS_RES, False,
        )  # fmt: skip

    def _launcher(kernel, grid: tuple[int], pdl: bool):
        """``kernel[grid]`` as a ``triton_op`` body launches it (``wrap_triton``), or, with
        ``pdl``, launched directly with the dependent-launch attribute (the body of an
        opaque ``custom_op``)."""
        if pdl:
            return functools.partial(kernel[grid], launch_pdl=True)
        return wrap_triton(kernel)[grid]

    def launch(
        x, weight, out, bias, norm_weight, residual, eps: float, act: int, config=None, scale=None,
        pdl: bool = False,
    ) -> None:  # fmt: skip
        """Run the kernel into ``out``; ``config`` overrides :func:`launch_config`. An int8
        ``weight`` takes its per-row ``scale``. ``pdl``: launch with programmatic dependent
        launch (Hopper and later; not inside a ``triton_op``)."""
        n, k = weight.shape
        block_n, block_k, warps, stages = config or launch_config(n, k, weight.element_size())
        _launcher(_gemv_kernel, (triton.cdiv(n, block_n),), pdl)(
            x, weight, out,
            x if bias is None else bias,
            x if norm_weight is None else norm_weight,
            x if residual is None else residual,
            x if scale is None else scale,
            n, k, weight.stride(0), eps,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            NORM=norm_weight is not None,
            ACT=act,
            HAS_BIAS=bias is not None,
            HAS_RES=residual is not None,
            HAS_SCALE=scale is not None,
            PDL=pdl,
            num_warps=warps,
            num_stages=stages,
        )  # fmt: skip

    def launch_int4(
        x, codes, scales, mins, out, bias, norm_weight, residual, eps: float, act: int,
        config=None, pdl: bool = False,
    ) -> None:  # fmt: skip
        """The int4 kernel into ``out``; ``config`` overrides :func:`launch_config_int4`;
        ``pdl`` as for :func:`launch`."""
        n, k = codes.shape[0], 2 * codes.shape[1]
        group = k // scales.shape[1]
        block_n, block_k, warps, stages = config or launch_config_int4(n, k, group)
        _launcher(_gemv_int4_kernel, (triton.cdiv(n, block_n),), pdl)(
            x, codes, scales, mins, out,
            x if bias is None else bias,
            x if norm_weight is None else norm_weight,
            x if residual is None else residual,
            n, k, codes.stride(0), scales.stride(0), eps,
            GROUP=group,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            NORM=norm_weight is not None,
            ACT=act,
            HAS_BIAS=bias is not None,
            HAS_RES=residual is not None,
            PDL=pdl,
            num_warps=warps,
            num_stages=stages,
        )  # fmt: skip

    def _gemv_impl(pdl: bool):
        """The body of ``fermi::gemv`` (``pdl`` False) or ``fermi::gemv_pdl``."""

        def gemv_op(
            x: torch.Tensor,
            weight: torch.Tensor,
            bias: torch.Tensor | None,
            norm_weight: torch.Tensor | None,
            residual: torch.Tensor | None,
            eps: float,
            act: int,
            scale: torch.Tensor | None,
        ) -> torch.Tensor:
            out = x.new_empty((*x.shape[:-1], weight.shape[0]))
            launch(x, weight, out, bias, norm_weight, residual, eps, act, scale=scale, pdl=pdl)
            return out

        return gemv_op

    def _gemv_int4_impl(pdl: bool):
        """The body of ``fermi::gemv_int4`` (``pdl`` False) or ``fermi::gemv_int4_pdl``."""

        def gemv_int4_op(
            x: torch.Tensor,
            codes: torch.Tensor,
            scales: torch.Tensor,
            mins: torch.Tensor,
            bias: torch.Tensor | None,
            norm_weight: torch.Tensor | None,
            residual: torch.Tensor | None,
            eps: float,
            act: int,
        ) -> torch.Tensor:
            out = x.new_empty((*x.shape[:-1], codes.shape[0]))
            launch_int4(
                x, codes, scales, mins, out, bias, norm_weight, residual, eps, act, pdl=pdl
            )  # fmt: skip
            return out

        return gemv_int4_op

    def _rows_out(x: torch.Tensor, weight: torch.Tensor, *rest) -> torch.Tensor:
        """Both ops' output without running them (their fake implementation)."""
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    _gemv_op = triton_op("fermi::gemv", mutates_args={})(_gemv_impl(False))
    _gemv_int4_op = triton_op("fermi::gemv_int4", mutates_args={})(_gemv_int4_impl(False))
    # The same products launched with PDL. Opaque to torch.compile (``custom_op``): Inductor
    # cannot analyse a user kernel's griddepcontrol instructions and drops the attribute
    # from a ``triton_op`` (perf/LOG.md run 80); under CUDA graphs the Python launch runs at
    # capture only.
    _gemv_pdl_op = torch.library.custom_op("fermi::gemv_pdl", mutates_args=())(_gemv_impl(True))
    _gemv_pdl_op.register_fake(_rows_out)
    _gemv_int4_pdl_op = torch.library.custom_op("fermi::gemv_int4_pdl", mutates_args=())(
        _gemv_int4_impl(True)
    )
    _gemv_int4_pdl_op.register_fake(_rows_out)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    act: int = ACT_NONE,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``[residual +] linear(pre(x), weight, bias)`` for one row ``x`` [..., K] (or [..., 2K]
    with ``act=ACT_SILU_MUL``), where ``pre`` is RMSNorm with ``norm_weight`` and/or
    silu(gate) * up. An int8 ``weight`` [N, K] stands for ``weight * scale[:, None]``.
    Contiguous operands; returns [..., N] in ``x``'s dtype. ``pdl``: launched with
    programmatic dependent launch (ask :func:`pdl_wanted`)."""
    if triton is None:
        raise RuntimeError("the fused GEMV needs Triton (a CUDA build of torch)")
    _check_one_row(x)
    op = _gemv_pdl_op if pdl else _gemv_op
    return op(x, weight, bias, norm_weight, residual, float(eps), act, scale)


def gemv_int4(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    act: int = ACT_NONE,
    residual: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """:func:`gemv` with group-wise int4 weights: ``codes`` [N, K/2] (uint8, the layout of
    ``fermi.models.quant.pack_int4``), ``scales`` and ``mins`` [N, K/group]."""
    if triton is None:
        raise RuntimeError("the fused GEMV needs Triton (a CUDA build of torch)")
    _check_one_row(x)
    op = _gemv_int4_pdl_op if pdl else _gemv_int4_op
    return op(x, codes, scales, mins, bias, norm_weight, residual, float(eps), act)


def row_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    act: int = ACT_NONE,
    residual: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """:func:`gemv` on a CUDA device with Triton (``pdl`` as there), else
    :func:`gemv_reference`; one row on every device, so that a caller the kernel would
    refuse fails on CPU too."""
    _check_one_row(x)
    fused = {"norm_weight": norm_weight, "eps": eps, "act": act, "residual": residual}
    if x.is_cuda and triton is not None:
        return gemv(x, weight, bias, pdl=pdl, **fused)
    return gemv_reference(x, weight, bias, **fused)


def _check_one_row(x: torch.Tensor) -> None:
    rows = x.numel() // x.shape[-1]
    if rows != 1:
        raise ValueError(f"gemv takes one row, got {rows}")


def gemv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    act: int = ACT_NONE,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """What :func:`gemv` computes, spelled with the unfused torch ops."""
    if act == ACT_SILU_MUL:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm_weight is not None:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        x = norm_weight * h.to(x.dtype)
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y
