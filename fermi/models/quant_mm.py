"""Products with int8/int4 weights on CUDA for more than one row (``QuantLinear.forward``).

Up to ``FEW_ROWS`` rows (decode of a small batch, or a one-row product the fused kernels of
``fermi.models.gemv`` do not take) one Triton kernel streams the quantized weights once,
dequantizes each tile in registers and multiplies it with ``tl.dot`` (the rows padded to 16,
the smallest tile ``tl.dot`` takes: the product is bound by the weights' bytes, not by the
multiply). Above that (prefill) the weight is dequantized into a scratch matrix of the
activations' dtype by a second Triton kernel (the codes read once, the weight written once)
and multiplied by cuBLAS.

The op is opaque to ``torch.compile`` (``torch.library.custom_op``): it picks its path from
the actual row count at run time, so the choice adds no guard and no recompile, and CUDA
graphs capture whichever path a shape takes. Importing this module needs Triton.
"""

# ruff: noqa: N803 (Triton style: pointer and constexpr arguments in capitals)
from __future__ import annotations

import torch
import torch.nn.functional as F

from fermi.models.gemv import triton  # None where Triton is absent or not wanted (see there)

if triton is not None:
    import triton.language as tl

FEW_ROWS = 16


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _few_rows_kernel(
        X, C, SC, MN, B, Y,
        M, N, K, stride_x, stride_c, stride_s, stride_y,
        INT4: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        dt = X.dtype.element_ty
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ok = outs < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if INT4:
            # One step: BLOCK_K values = GROUPS groups, each a scale and a minimum; the codes
            # are cut [BLOCK_N, GROUPS, HALF] so each group's pair multiplies its own bytes
            # (a gather of one scale per byte is as many loads as bytes).
            HALF: tl.constexpr = GROUP // 2
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            byte = tl.arange(0, BLOCK_K // 2)
            lo_cols0 = (byte // HALF) * GROUP + byte % HALF
            group0 = tl.arange(0, GROUPS)
            for k0 in range(0, K, BLOCK_K):
                lo_cols = k0 + lo_cols0
                col_ok = lo_cols < K
                codes = tl.load(
                    C + outs[:, None] * stride_c + (k0 // 2 + byte)[None, :],
                    mask=out_ok[:, None] & col_ok[None, :],
                    other=0,
                )
                groups = k0 // GROUP + group0
                at = outs[:, None] * stride_s + groups[None, :]
                gmask = out_ok[:, None] & (groups < K // GROUP)[None, :]
                scale = tl.load(SC + at, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
                low = tl.load(MN + at, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
                q_lo = tl.reshape((codes & 0xF).to(tl.float32), (BLOCK_N, GROUPS, HALF))
                q_hi = tl.reshape((codes >> 4).to(tl.float32), (BLOCK_N, GROUPS, HALF))
                w_lo = tl.reshape(q_lo * scale + low, (BLOCK_N, BLOCK_K // 2)).to(dt)
                w_hi = tl.reshape(q_hi * scale + low, (BLOCK_N, BLOCK_K // 2)).to(dt)
                xmask = row_ok[:, None] & col_ok[None, :]
                xs = X + rows[:, None] * stride_x + lo_cols[None, :]
                x_lo = tl.load(xs, mask=xmask, other=0.0)
                x_hi = tl.load(xs + HALF, mask=xmask, other=0.0)
                if IEEE:
                    acc += tl.dot(x_lo, tl.trans(w_lo), input_precision="ieee")
                    acc += tl.dot(x_hi, tl.trans(w_hi), input_precision="ieee")
                else:
                    acc += tl.dot(x_lo, tl.trans(w_lo))
                    acc += tl.dot(x_hi, tl.trans(w_hi))
        else:
            cols0 = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                col_ok = cols < K
                w = tl.load(
                    C + outs[:, None] * stride_c + cols[None, :],
                    mask=out_ok[:, None] & col_ok[None, :],
                    other=0,
                ).to(dt)  # -127..127: exact in bf16 and fp16
                x = tl.load(
                    X + rows[:, None] * stride_x + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                if IEEE:
                    acc += tl.dot(x, tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w))
            acc *= tl.load(SC + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(B + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            Y + rows[:, None] * stride_y + outs[None, :],
            acc.to(dt),
            mask=row_ok[:, None] & out_ok[None, :],
        )

    def launch_few_rows(x2, codes, scales, mins, bias, out, config=None) -> None:
        """The few-row kernel: ``x2`` [M, K] into ``out`` [M, N]; ``config`` is
        (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
        m, k = x2.shape
        n = codes.shape[0]
        int4 = mins is not None
        group = k // scales.shape[1] if int4 else k
        block_n, block_k, warps, stages = config or few_rows_config(n, k, int4, group)
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, 16))
        _few_rows_kernel[grid](
            x2, codes, scales,
            scales if mins is None else mins,
            x2 if bias is None else bias,
            out,
            m, n, k, x2.stride(0), codes.stride(0), scales.stride(0), out.stride(0),
            INT4=int4,
            GROUP=group if int4 else 32,
            BLOCK_M=16,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            HAS_BIAS=bias is not None,
            IEEE=x2.dtype == torch.float32,
            num_warps=warps,
            num_stages=stages,
        )  # fmt: skip

    @triton.jit
    def _dequant_kernel(
        C, SC, MN, W,
        N, K, stride_c, stride_s, stride_w,
        INT4: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """The weight in W's dtype, a [BLOCK_N, BLOCK_K] tile a program: ``q * scale +
        min`` (int4) or ``q * scale`` (int8) in float32, then rounded to W's dtype."""
        outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ok = outs < N
        k0 = tl.program_id(1) * BLOCK_K
        dt = W.dtype.element_ty
        if INT4:
            HALF: tl.constexpr = GROUP // 2
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            byte = tl.arange(0, BLOCK_K // 2)
            lo_cols = k0 + (byte // HALF) * GROUP + byte % HALF
            mask = out_ok[:, None] & (lo_cols < K)[None, :]
            codes = tl.load(C + outs[:, None] * stride_c + (k0 // 2 + byte)[None, :], mask=mask)
            groups = k0 // GROUP + tl.arange(0, GROUPS)
            at = outs[:, None] * stride_s + groups[None, :]
            gmask = out_ok[:, None] & (groups < K // GROUP)[None, :]
            scale = tl.load(SC + at, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
            low = tl.load(MN + at, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
            q_lo = tl.reshape((codes & 0xF).to(tl.float32), (BLOCK_N, GROUPS, HALF))
            q_hi = tl.reshape((codes >> 4).to(tl.float32), (BLOCK_N, GROUPS, HALF))
            # (a fused multiply-add where the compiler makes one: within one float32 rounding
            # of torch's separate multiply and add, below the output dtype's rounding)
            w_lo = tl.reshape(q_lo * scale + low, (BLOCK_N, BLOCK_K // 2))
            w_hi = tl.reshape(q_hi * scale + low, (BLOCK_N, BLOCK_K // 2))
            to = W + outs[:, None] * stride_w + lo_cols[None, :]
            tl.store(to, w_lo.to(dt), mask=mask)
            tl.store(to + HALF, w_hi.to(dt), mask=mask)
        else:
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = out_ok[:, None] & (cols < K)[None, :]
            q = tl.load(C + outs[:, None] * stride_c + cols[None, :], mask=mask).to(tl.float32)
            scale = tl.load(SC + outs, mask=out_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(W + outs[:, None] * stride_w + cols[None, :], (q * scale).to(dt), mask=mask)

    def launch_dequantize(codes, scales, mins, out) -> None:
        """The dequantize kernel: ``QuantLinear``'s CUDA layout into ``out`` [N, K]."""
        n, k = out.shape
        int4 = mins is not None
        group = k // scales.shape[1] if int4 else 32
        block_n, block_k = 32, max(128, group)
        grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
        _dequant_kernel[grid](
            codes, scales, scales if mins is None else mins, out,
            n, k, codes.stride(0), scales.stride(0), out.stride(0),
            INT4=int4, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip


def few_rows_config(n: int, k: int, int4: bool, group: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): 32 outputs a program (enough programs for
    every Qwen3 shape), 256 columns a step, three stages: at 8 rows, the H200 sweep's best
    overall for int8 and int4 over Qwen3-1.7B's and 8B's products (on average 1.03 and 1.02
    times each product's best; LOG run 64)."""
    block_k = 256 if k >= 256 else max(32, 1 << (k - 1).bit_length())
    if int4:
        block_k = max(block_k, group)
    return 32, block_k, 4, 3


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The [N, K] weight in ``dtype``, from the CUDA layout of ``QuantLinear``: one Triton
    kernel on CUDA (reads the codes once, writes the weight once), else
    :func:`dequantize_torch` (the same values, up to one float32 rounding before the
    cast)."""
    if triton is None or not codes.is_cuda:
        return dequantize_torch(codes, scales, mins, dtype)
    n = codes.shape[0]
    k = codes.shape[1] * (2 if mins is not None else 1)
    out = torch.empty((n, k), device=codes.device, dtype=dtype)
    launch_dequantize(codes, scales, mins, out)
    return out


def dequantize_torch(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`dequantize` in torch's operations: float32 temporaries of the whole matrix
    (on CUDA, ~13 times the bytes of the kernel: perf/LOG.md run 78)."""
    if mins is None:
        return (codes.to(torch.float32) * scales.float()[:, None]).to(dtype)
    n, half = codes.shape
    groups = scales.shape[1]
    c = codes.view(n, groups, half // groups)
    q = torch.cat((c & 0xF, c >> 4), dim=2).to(torch.float32)
    w = q * scales.float()[..., None] + mins.float()[..., None]
    return w.view(n, 2 * half).to(dtype)


@torch.library.custom_op("fermi::quant_linear", mutates_args=())
def _quant_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    n = codes.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= FEW_ROWS and triton is not None and x.is_cuda:
        x2 = x2.contiguous()
        out = x2.new_empty((x2.shape[0], n))
        launch_few_rows(x2, codes, scales, mins, bias, out)
    else:
        out = F.linear(x2, dequantize(codes, scales, mins, x.dtype), bias)
    return out.view(*x.shape[:-1], n)


@_quant_linear.register_fake
def _(x, codes, scales, mins, bias):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def quant_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W the int8 (``mins`` None: per-row ``scales``) or int4 weight
    in ``QuantLinear``'s CUDA layout; returns ``x``'s dtype."""
    return _quant_linear(x, codes, scales, mins, bias)
