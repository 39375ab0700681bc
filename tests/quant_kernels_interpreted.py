"""Run by tests/test_quant.py in a fresh process with TRITON_INTERPRET=1: the Triton kernels
of fermi.models.gemv and fermi.models.quant_mm on CPU tensors against their references.
Prints one JSON object, case -> [max relative error, tolerance]; exits 3 when this Triton's
interpreter cannot run here. Not a test module."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from fermi.models import gemv as G  # noqa: E402 (after the variable is checked)
from fermi.models import quant as Q  # noqa: E402
from fermi.models import quant_mm as QM  # noqa: E402


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


# What Triton < 3.7's interpreter raises for a loop bound under numpy >= 2.3, which no longer
# turns a one-element array into a Python int (triton-lang/triton#9171).
NUMPY_TOO_NEW = "only 0-dimensional arrays can be converted to Python scalars"


def main() -> None:
    from triton.runtime.errors import InterpreterError

    try:  # only that incompatibility skips: any other error of a launch fails the test
        probe = torch.empty(1, 4)
        G.launch(torch.ones(1, 16), torch.ones(4, 16), probe, None, None, None, 1e-6, 0)
    except InterpreterError as exc:
        if NUMPY_TOO_NEW not in str(exc):
            raise
        print(f"Triton's interpreter does not run here: {exc}")
        sys.exit(3)
    results: dict[str, list[float]] = {}
    g = torch.Generator().manual_seed(0)
    # (37, 96): K below one block, the masks exercised; the launch rules' narrow-output
    # branches (gemv.launch_config / launch_config_int4): (64, 2048) two rows x 1,024 (int8)
    # / 2,048 (int4), (24, 6144) two rows x 2,048 (long K), (24, 4096) int4's 4,096 columns
    # a step. (The wide-output branches' rows, four and eight a program, ran on the H200.)
    for n, k in ((37, 96), (64, 2048), (24, 6144), (24, 4096)):
        w = torch.randn(n, k, generator=g) * 0.05
        q8, q4 = Q.quantize_int8(w), Q.quantize_int4(w, 32)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            # fp32: only the order of the sums differs; 16-bit: a rounding of the output.
            tol = 1e-5 if dt == torch.float32 else 1.5e-2
            x, x2 = torch.randn(1, k, generator=g).to(dt), torch.randn(1, 2 * k, generator=g).to(dt)
            norm_w = (torch.rand(k, generator=g) + 0.5).to(dt)
            bias, res = torch.randn(n, generator=g).to(dt), torch.randn(1, n, generator=g).to(dt)
            cases = {
                "plain": ({}, x),
                "norm": ({"norm_weight": norm_w, "eps": 1e-5}, x),
                "norm+bias": ({"norm_weight": norm_w, "bias": bias}, x),
                "residual": ({"residual": res}, x),
                "silu*up+bias+residual": (
                    {"act": G.ACT_SILU_MUL, "residual": res, "bias": bias},
                    x2,
                ),
            }
            for label, (extra, inp) in cases.items():
                fused = dict(extra)
                b = fused.pop("bias", None)
                args = (fused.get("norm_weight"), fused.get("residual"), fused.get("eps", 1e-6))
                act = fused.get("act", G.ACT_NONE)
                for kind in ("bf16-row", "int8-row", "int4-row"):
                    out = torch.empty(1, n, dtype=dt)
                    if kind == "bf16-row":
                        ref_w = w.to(dt)
                        G.launch(inp, ref_w, out, b, *args, act)
                    elif kind == "int8-row":
                        G.launch(inp, q8.codes, out, b, *args, act, scale=q8.scales)
                        ref_w = q8.dequantize(dt)
                    else:
                        scales, mins = q4.scales.half(), q4.mins.half()
                        G.launch_int4(inp, q4.codes, scales, mins, out, b, *args, act)
                        ref_w = Q.device_precision(q4, "cuda").dequantize(dt)
                    want = G.gemv_reference(inp, ref_w, b, **fused)
                    results[f"{kind} {n}x{k} {dt} {label}"] = [rel(out, want), tol]
            if dt == torch.bfloat16:
                continue  # the interpreter's tl.dot misreads bf16 (see the test)
            for m in (1, 17):
                xm = torch.randn(m, k, generator=g).to(dt)
                for kind in ("int8", "int4"):
                    out = torch.empty(m, n, dtype=dt)
                    if kind == "int8":
                        QM.launch_few_rows(xm, q8.codes, q8.scales, None, bias, out)
                        want = F.linear(xm.float(), q8.dequantize(), bias.float())
                    else:
                        QM.launch_few_rows(
                            xm, q4.codes, q4.scales.half(), q4.mins.half(), None, out
                        )
                        want = F.linear(xm.float(), Q.device_precision(q4, "cuda").dequantize())
                    # fp16 also rounds the dequantized weights before the product
                    few_tol = 1e-5 if dt == torch.float32 else 3e-3
                    results[f"few-rows {kind} {m}x{n}x{k} {dt}"] = [rel(out, want), few_tol]
    # The one-row int4 kernel at groups 64 and 128 (its launch rule and layout take the
    # group), K off its blocks (2,176 = 17 groups of 128) and at a 4,096 step; and eight rows
    # a program (the rule's choice from 4,096 outputs up), the last program's partly past N.
    for group, n, k in ((64, 24, 2176), (64, 24, 4096), (128, 24, 2176), (128, 24, 4096),
                        (32, 4100, 512)):  # fmt: skip
        if n >= 4096:
            assert G.launch_config_int4(n, k, group)[0] == 8
        q4 = Q.quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)
        x, out = torch.randn(1, k, generator=g), torch.empty(1, n)
        G.launch_int4(x, q4.codes, q4.scales.half(), q4.mins.half(), out, None, None, None,
                      1e-6, G.ACT_NONE)  # fmt: skip
        want = F.linear(x, Q.device_precision(q4, "cuda").dequantize())
        results[f"int4-row g{group} {n}x{k} torch.float32 plain"] = [rel(out, want), 1e-5]
    # The dequantize kernel (prefill's weight for cuBLAS) against torch's operations on the
    # same layout: N and K off its 32 x 128 tiles, groups 32 / 64 / 128 (a tile of 128 values
    # holds one group of 128), int8, into a NaN-filled output. The error is relative to the
    # weight's largest value, within one rounding of the dtype: where the GPU's compiler
    # fuses the multiply and the add, one float32 rounding fewer can move a 16-bit result.
    for scheme, group, n, k in (("int4", 32, 37, 96), ("int4", 32, 40, 416),
                                ("int4", 64, 33, 320), ("int4", 128, 70, 384),
                                ("int8", 0, 37, 200)):  # fmt: skip
        w = torch.randn(n, k, generator=g) * 0.05
        q = Q.quantize_int4(w, group) if scheme == "int4" else Q.quantize_int8(w)
        codes, scales = q.codes, q.scales.half() if scheme == "int4" else q.scales
        mins = q.mins.half() if scheme == "int4" else None
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            out = torch.full((n, k), float("nan"), dtype=dt)
            QM.launch_dequantize(codes, scales, mins, out)
            want = QM.dequantize_torch(codes, scales, mins, dt)
            tol = {torch.float32: 1.2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dt]
            label = f"dequantize {scheme} g{group} {n}x{k} {dt}"
            results[label] = [rel(out, want), tol]
    results.update(pdl_kernels(g))
    results.update(pdl_dispatch(g))
    print(json.dumps(results))


def pdl_kernels(g: torch.Generator) -> dict[str, list[float]]:
    """The one-row kernels as launched with programmatic dependent launch (the first tile
    read before the wait, the loop from the second), through ``launch(..., pdl=True)``;
    the interpreter cannot run ``griddepcontrol``, so the wait and the early launch are
    no-ops here: this checks the arithmetic of the PDL variants, not the launch. Shapes:
    K below one block, K one int4 step exactly (an empty loop), K over several steps."""
    import triton.language.extra.cuda as gdc

    saved = gdc.gdc_wait, gdc.gdc_launch_dependents
    gdc.gdc_wait = gdc.gdc_launch_dependents = lambda: None
    results = {}
    try:
        for n, k in ((37, 96), (24, 4096), (24, 6144)):
            w = torch.randn(n, k, generator=g) * 0.05
            q8, q4 = Q.quantize_int8(w), Q.quantize_int4(w, 32)
            for dt in (torch.float32, torch.bfloat16):
                tol = 1e-5 if dt == torch.float32 else 1.5e-2
                x = torch.randn(1, k, generator=g).to(dt)
                x2 = torch.randn(1, 2 * k, generator=g).to(dt)
                norm_w = (torch.rand(k, generator=g) + 0.5).to(dt)
                bias, res = (
                    torch.randn(n, generator=g).to(dt),
                    torch.randn(1, n, generator=g).to(dt),
                )
                cases = {
                    "norm+bias": (x, bias, norm_w, None, G.ACT_NONE),
                    "silu*up+residual": (x2, None, None, res, G.ACT_SILU_MUL),
                }
                for label, (inp, b, nw, r, act) in cases.items():
                    for kind in ("bf16-row", "int8-row", "int4-row"):
                        out = torch.full((1, n), float("nan"), dtype=dt)
                        if kind == "bf16-row":
                            ref_w = w.to(dt)
                            G.launch(inp, ref_w, out, b, nw, r, 1e-6, act, pdl=True)
                        elif kind == "int8-row":
                            ref_w = q8.dequantize(dt)
                            G.launch(inp, q8.codes, out, b, nw, r, 1e-6, act, scale=q8.scales,
                                     pdl=True)  # fmt: skip
                        else:
                            ref_w = Q.device_precision(q4, "cuda").dequantize(dt)
                            G.launch_int4(inp, q4.codes, q4.scales.half(), q4.mins.half(), out,
                                          b, nw, r, 1e-6, act, pdl=True)  # fmt: skip
                        want = G.gemv_reference(
                            inp, ref_w, b, norm_weight=nw, residual=r, act=act, eps=1e-6
                        )
                        results[f"pdl {kind} {n}x{k} {dt} {label}"] = [rel(out, want), tol]
    finally:
        gdc.gdc_wait, gdc.gdc_launch_dependents = saved
    return results


def pdl_dispatch(g: torch.Generator) -> dict[str, list[float]]:
    """``gemv`` / ``gemv_int4`` with ``pdl=True`` (what a layer with ``row_pdl`` passes)
    trace under ``torch.compile(fullgraph=True, dynamic=True)`` as the opaque
    ``fermi::gemv_pdl`` / ``fermi::gemv_int4_pdl`` ops, with the shapes of their fake
    implementations; the ops' launches run the plain kernels here (see pdl_kernels). An op
    missing from the graph, or a fake shape unlike the output's, counts as an infinite
    error."""
    plain, plain_int4 = G.launch, G.launch_int4
    G.launch = lambda *args, pdl=False, **kw: plain(*args, **kw)
    G.launch_int4 = lambda *args, pdl=False, **kw: plain_int4(*args, **kw)
    results = {}
    try:
        for n, k in ((37, 96), (24, 2048)):
            w = torch.randn(n, k, generator=g) * 0.05
            q4 = Q.quantize_int4(w, 32)
            scales, mins = q4.scales.half(), q4.mins.half()
            norm_w = torch.rand(k, generator=g) + 0.5
            x, res = torch.randn(1, k, generator=g), torch.randn(1, n, generator=g)
            for kind in ("bf16", "int4"):
                fakes: list[tuple[int, ...]] = []

                def backend(
                    gm, inputs, fakes=fakes, op=f"fermi.gemv{'_int4' * (kind == 'int4')}_pdl"
                ):
                    for node in gm.graph.nodes:
                        if str(node.target).startswith(op + "."):
                            fakes.append(tuple(node.meta["example_value"].shape))
                    return gm.forward

                if kind == "bf16":
                    fn, ref_w, args = G.gemv, w, (w,)
                else:
                    fn, ref_w = G.gemv_int4, Q.device_precision(q4, "cuda").dequantize()
                    args = (q4.codes, scales, mins)

                def product(x, r, fn=fn, args=args, nw=norm_w):
                    return fn(x, *args, norm_weight=nw, residual=r, pdl=True)

                compiled = torch.compile(product, backend=backend, fullgraph=True, dynamic=True)
                got = compiled(x, res)
                want = G.gemv_reference(x, ref_w, norm_weight=norm_w, residual=res)
                traced = len(fakes) == 1 and len(fakes[0]) == 2 and got.shape == want.shape
                error = rel(got, want) if traced else 1e9
                results[f"pdl op traced {kind} {n}x{k}"] = [error, 1e-5]
    finally:
        G.launch, G.launch_int4 = plain, plain_int4
    return results


if __name__ == "__main__":
    main()
