"""fermi's own CPU kernels (``fermi.native``): the products and the one-token attention
against float64 references on fresh random inputs, for the build this CPU gets and for an
AVX2-only build; decoders whose decode steps run in them against the same fp16 weights in
torch's ops; and the fallbacks when the kernels cannot be built."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fermi import native
from fermi.models.half_weights import (
    HalfWeightLinear,
    best_layout,
    native_block,
    native_unblock,
    use_half_weights,
)
from fermi.models.quant import (
    INT8_BLOCK,
    QuantizedWeight,
    native_pack,
    native_unpack,
    quantize_int4,
    quantize_int8,
    rounded_inputs,
)
from tests.test_fuse_projections import CONFIGS, random_decoder

X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX2_FLAGS = ("-O3", "-march=haswell", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
# AVX-512 without VNNI (the quantized products' two-instruction dot products)
SKYLAKE_FLAGS = ("-O3", "-march=skylake-avx512", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return all(f in line.split() for f in flags)


needs_kernels = pytest.mark.skipif(native.library() is None, reason="fermi's kernels need x86")


def test_the_kernels_build_wherever_x86_has_a_compiler():
    """On x86 Linux with a C compiler (CI's machine, this one) the kernels must build:
    every other test here would otherwise skip without a word."""
    if not (X86 and shutil.which(os.environ.get("CC") or "cc") and _cpu_has("avx2", "f16c")):
        pytest.skip("not an x86 machine with AVX2 and a C compiler")
    lib = native.library()
    assert lib is not None
    assert lib.fermi_simd() in (256, 512)
    assert best_layout() == "native"


def _other_build(tmp_path_factory, name: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    os.environ["FERMI_NATIVE_CACHE"] = str(tmp_path_factory.mktemp(name))
    try:
        return native.load(native.build(flags))
    finally:
        del os.environ["FERMI_NATIVE_CACHE"]


def builds(tmp_path_factory) -> list[tuple[str, ctypes.CDLL]]:
    out = []
    lib = native.library()
    if lib is not None:
        out.append((f"native ({lib.fermi_simd()}-bit)", lib))
        if lib.fermi_simd() == 512 and _cpu_has("avx2", "f16c", "fma"):
            # The AVX2 code path, which an AVX2-only CPU (CI's, some days) compiles.
            avx2 = _other_build(tmp_path_factory, "avx2", AVX2_FLAGS)
            assert avx2.fermi_simd() == 256
            out.append(("avx2", avx2))
        if _cpu_has("avx512_vnni", "avx512bw", "avx512vl", "avx512dq", "avx512cd"):
            # This machine's native build takes vpdpwssd: the path without it too.
            out.append(
                ("avx512 without vnni", _other_build(tmp_path_factory, "skx", SKYLAKE_FLAGS))
            )
    return out


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    found = builds(tmp_path_factory)
    if not found:
        pytest.skip("fermi's kernels do not build here")
    return found


def fp16(blocked: torch.Tensor) -> native.Weight:
    return native.Weight(blocked.data_ptr(), None, None, 0, native.FORMATS["fp16"])


def quantized(q: QuantizedWeight) -> tuple[native.Weight, tuple]:
    """``q`` in the kernels' int8/int4 panels: the structure, and the tensors it points at
    (held by the caller for the calls)."""
    codes, scales, mins = native_pack(q)
    group = q.group_size if q.scheme == "int4" else 0
    ptr = None if mins is None else mins.data_ptr()
    weight = native.Weight(
        codes.data_ptr(), scales.data_ptr(), ptr, group, native.FORMATS[q.scheme]
    )
    return weight, (codes, scales, mins)


def linear(lib, weight, n, k, x, bias=None, norm=None, eps=1e-6, act=0, residual=None, code=0):
    """One call of fermi_linear on float32 rows x [m, k (2k with act)]; ``code`` the
    result it must return."""
    x = x.contiguous()
    m = x.shape[0]
    y = torch.full((m, n), float("nan"))
    got = lib.fermi_linear(
        ctypes.byref(weight),
        None if bias is None else bias.data_ptr(),
        n,
        k,
        x.data_ptr(),
        x.shape[1],
        m,
        None if norm is None else norm.data_ptr(),
        eps,
        act,
        None if residual is None else residual.data_ptr(),
        n,
        y.data_ptr(),
        n,
        torch.get_num_threads(),
    )
    assert got == code
    return y


@pytest.mark.parametrize(("n", "k"), [(1, 1), (15, 17), (16, 16), (33, 100), (300, 576)])
def test_products_are_the_float_products_of_the_fp16_weights(libs, n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    weight = torch.randn(n, k, generator=g)
    blocked = native_block(weight)
    w = weight.half().double()
    assert torch.equal(native_unblock(blocked, n, k), weight.half())  # the layout round-trips
    panels = fp16(blocked)  # (pointing into blocked, kept below)
    bias = torch.randn(n, generator=g)
    for name, lib in libs:
        for m in (1, 2, 3, 7, 8, 9, 17):
            x = torch.randn(m, k, generator=g)
            residual = torch.randn(m, n, generator=g)
            ref = x.double() @ w.T
            got = linear(lib, panels, n, k, x)
            # float32 sums of k products of values ~1 (sums ~sqrt(k)) against float64: each
            # addition rounds by ~6e-8 of the running sum
            tol = 1e-7 * k
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=tol, msg=name)
            got = linear(lib, panels, n, k, x, bias=bias, residual=residual)
            ref_br = ref + bias.double() + residual.double()
            torch.testing.assert_close(got.double(), ref_br, rtol=1e-5, atol=tol, msg=name)


def test_fused_norm_and_silu_are_the_unfused_ops(libs):
    g = torch.Generator().manual_seed(7)
    n, k = 40, 72
    weight = torch.randn(n, k, generator=g)
    blocked, w = native_block(weight), weight.half().double()
    panels = fp16(blocked)
    norm = torch.randn(k, generator=g)
    for name, lib in libs:
        for m in (1, 3, 9):
            x = torch.randn(m, k, generator=g) * 3
            h = x.double()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.double()
            got = linear(lib, panels, n, k, x, norm=norm, eps=1e-5)
            torch.testing.assert_close(got.double(), h @ w.T, rtol=1e-5, atol=1e-5, msg=name)
            gu = torch.randn(m, 2 * k, generator=g)
            gate, up = gu.double().chunk(2, dim=-1)
            ref = (F.silu(gate) * up) @ w.T
            got = linear(lib, panels, n, k, gu, act=1)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(("scheme", "group"), [("int8", 0), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (15, 64), (33, 128), (300, 576)])
def test_quantized_products_are_the_float_products_of_their_codes(libs, scheme, group, n, k):
    """int8 (a scale per row) and int4 (a scale and minimum per group) panels, every row
    count a tile takes and more, against float64 products with the weights the codes stand
    for; the panels give back the codes, scales and minimums they were made from."""
    g = torch.Generator().manual_seed(n * 7 + k + group)
    source = torch.randn(n, k, generator=g)
    q = quantize_int8(source) if scheme == "int8" else quantize_int4(source, group)
    weight, held = quantized(q)
    back = native_unpack(*held, n, k, q.group_size)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert (back.mins is None) == (q.mins is None)
    assert q.mins is None or torch.equal(back.mins, q.mins)
    w = q.dequantize(torch.float64)  # (quantize_int4's scales and minimums are fp16 values)

    block = group if scheme == "int4" else INT8_BLOCK
    mins = torch.zeros_like(w) if q.mins is None else q.mins.double().repeat_interleave(group, 1)

    def product(u: torch.Tensor) -> torch.Tensor:
        """What the format computes for prepared float32 rows u: the codes' part with u
        rounded as rounded_inputs says, int4's minimums' part with u itself."""
        return rounded_inputs(u.float(), block).double() @ (w - mins).T + u.double() @ mins.T

    def flips(u: torch.Tensor) -> float:
        return 2 * (w - mins).abs().max().item() * u.abs().max().item() / 32767

    bias, norm = torch.randn(n, generator=g), torch.randn(k, generator=g)
    for name, lib in libs:
        for m in (1, 2, 3, 4, 7, 8, 9, 17):
            x = torch.randn(m, k, generator=g)
            residual = torch.randn(m, n, generator=g)
            # float32 sums of k terms up to ~3 (integer block sums scaled by the weights'
            # scales and the inputs' ~3 / 127; int4's minimums ~-3 times a group's sum)
            tol = 1e-6 * k
            got = linear(lib, weight, n, k, x, bias=bias, residual=residual)
            ref = product(x) + bias.double() + residual.double()
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=tol, msg=name)
            # The kernel normalises (or takes silu(gate) * up) in float32: an input an ulp
            # or two from this float64 one may round to the next int16 step, which moves an
            # output by up to the largest |code * scale| times that step; allow two.
            h = rms(x.double(), norm.double(), 1e-5)
            got = linear(lib, weight, n, k, x, norm=norm, eps=1e-5)
            atol = tol + flips(h)
            torch.testing.assert_close(
                got.double(), product(h.float()), rtol=1e-5, atol=atol, msg=name
            )
            gu = torch.randn(m, 2 * k, generator=g)
            gate, up = gu.double().chunk(2, dim=-1)
            got = linear(lib, weight, n, k, gu, act=1)
            u = F.silu(gate) * up
            atol = tol + flips(u)
            torch.testing.assert_close(
                got.double(), product(u.float()), rtol=1e-5, atol=atol, msg=name
            )


@pytest.mark.parametrize(("scheme", "k"), [("int8", 64), ("int8", 33), ("int4", 64)])
def test_quantized_products_of_non_finite_and_tiny_inputs(libs, scheme, k):
    """A NaN or an infinity in a row's inputs makes that row's outputs NaN (the float
    products would be non-finite; int16 steps cannot hold them: a NaN rounded to an integer
    was a finite output, an infinity one of the wrong sign), and other rows keep their
    values; a block whose largest magnitude is below 32767 / FLT_MAX (~1e-34, where
    32767 / that magnitude overflowed) is rounded like any other, not to nonsense."""
    n = 16
    g = torch.Generator().manual_seed(k)
    source = torch.randn(n, k, generator=g)
    q = quantize_int8(source) if scheme == "int8" else quantize_int4(source, 32)
    weight, _held = quantized(q)
    w = q.dequantize(torch.float64)
    for name, lib in libs:
        x = torch.randn(4, k, generator=g)
        clean = linear(lib, weight, n, k, x)
        x[1, 5], x[2, 7], x[3, k - 1] = float("nan"), float("inf"), float("-inf")
        got = linear(lib, weight, n, k, x)
        assert torch.isnan(got[1:]).all(), name
        torch.testing.assert_close(got[0], clean[0], rtol=0, atol=0, msg=name)
        for scale in (1e-36, 1e-30):
            x = torch.randn(3, k, generator=g) * scale
            x[0, ::3] = 0.0
            ref = x.double() @ w.T
            got = linear(lib, weight, n, k, x).double()
            # (steps of 1e-36 / 32767 are subnormal floats: ~16 bits)
            atol = 1e-3 * ref.abs().max().item()
            torch.testing.assert_close(got, ref, rtol=0, atol=atol, msg=f"{name} {scale}")


def test_an_int4_weight_whose_groups_do_not_divide_its_inputs_is_refused(libs):
    q = quantize_int4(torch.randn(16, 64), 32)
    weight, _held = quantized(q)
    for _name, lib in libs:
        for group in (48, 3, 0):
            weight.group = group
            out = linear(lib, weight, 16, 64, torch.randn(2, 64), code=-2)
            assert torch.isnan(out).all()  # nothing written


def attention_reference(q, k_cache, v_cache, first, pos, scale):
    """q [h, d] over keys/values [kv, first..pos, d], float64."""
    h = q.shape[0]
    kv = k_cache.shape[0]
    keys = k_cache[:, first : pos + 1].double().repeat_interleave(h // kv, dim=0)
    values = v_cache[:, first : pos + 1].double().repeat_interleave(h // kv, dim=0)
    probs = torch.softmax((keys @ q.double()[:, :, None])[..., 0] * scale, dim=-1)
    return (probs[:, None, :] @ values)[:, 0]


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(("rot", "window"), [(32, None), (16, None), (0, None), (32, 5)])
def test_one_token_attention_writes_the_cache_and_attends_like_the_reference(
    libs, qk_norm, rot, window
):
    """q/k norms, rope (rotate-half, signed sin; partial; none), the write at pos, GQA and a
    window, against float64 on the values the kernel itself was given."""
    from fermi.models.rope import RopeConfig, rope_tables, rotate

    h, kv, d, seq = 6, 2, 32, 40
    g = torch.Generator().manual_seed(rot + (window or 0) + qk_norm)
    cos_t, sin_t = rope_tables(RopeConfig(theta=500.0, partial_rotary_factor=rot / d), d, seq)
    q_w, k_w = torch.randn(d, generator=g), torch.randn(d, generator=g)
    scale = 0.17
    for name, lib in libs:
        k_cache = torch.randn(kv, seq, d, generator=g)
        v_cache = torch.randn(kv, seq, d, generator=g)
        for pos in (0, 1, 9, seq - 1):
            qkv = torch.randn((h + 2 * kv) * d, generator=g)
            q, k, v = qkv.view(h + 2 * kv, d).split([h, kv, kv])
            if qk_norm:
                q, k = rms(q, q_w, 1e-6), rms(k, k_w, 1e-6)
            if rot:
                q = rotate(q, cos_t[pos], sin_t[pos])
                k = rotate(k, cos_t[pos], sin_t[pos])
            first = 0 if window is None else max(0, pos - window + 1)
            expected_k, expected_v = k_cache.clone(), v_cache.clone()
            expected_k[:, pos], expected_v[:, pos] = k, v
            ref = attention_reference(q, expected_k, expected_v, first, pos, scale)
            out = torch.full((h * d,), float("nan"))
            cos, sin = cos_t[pos].contiguous(), sin_t[pos].contiguous()
            code = lib.fermi_attend_row(
                qkv.data_ptr(),
                h,
                kv,
                d,
                q_w.data_ptr() if qk_norm else None,
                k_w.data_ptr() if qk_norm else None,
                1e-6,
                rot,
                cos.data_ptr() if rot else None,
                sin.data_ptr() if rot else None,
                k_cache.data_ptr(),
                v_cache.data_ptr(),
                seq,
                pos,
                first,
                scale,
                out.data_ptr(),
                1,
                0,
            )
            assert code == 0
            torch.testing.assert_close(k_cache, expected_k, rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, msg=name)
            got = out.view(h, d).double()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("cache", [torch.float32, torch.float16])
@pytest.mark.parametrize(("h", "kv"), [(4, 2), (9, 3), (8, 1), (5, 5)])
@pytest.mark.parametrize("d", [16, 24, 64, 96, 128, 256])
def test_attention_over_head_sizes_and_lengths(libs, d, h, kv, cache):
    """Scores 16 keys at a time (a transposed sum of 16 registers, whose lane order is easy
    to get wrong) and values 4 vectors of features at a time, at every head size the models
    use (and 24, which is not a multiple of 16), at lengths around multiples of 16, against
    float64; distinct score scales so that a key summed into the wrong lane shows. Query
    heads share a KV head 2, 3, 8 (two sets of 4 weighed together) and 1 at a time. An fp16
    cache (``cache``): the token's key and value written rounded to fp16 as torch rounds
    them, and the attention that of the rounded values."""
    seq = 150
    g = torch.Generator().manual_seed(d * h)
    half = int(cache == torch.float16)
    for name, lib in libs:
        k_cache = torch.randn(kv, seq, d, generator=g) * torch.linspace(0.2, 3.0, seq)[:, None]
        v_cache = torch.randn(kv, seq, d, generator=g)
        k_cache, v_cache = k_cache.to(cache), v_cache.to(cache)
        for pos in (14, 15, 16, 31, 32, 47, 100, seq - 1):
            for first in (0, 3):
                qkv = torch.randn((h + 2 * kv) * d, generator=g)
                q, k, v = qkv.view(h + 2 * kv, d).split([h, kv, kv])
                expected_k, expected_v = k_cache.clone(), v_cache.clone()
                expected_k[:, pos], expected_v[:, pos] = k.to(cache), v.to(cache)
                ref = attention_reference(
                    q, expected_k.float(), expected_v.float(), first, pos, d**-0.5
                )
                out = torch.full((h * d,), float("nan"))
                code = lib.fermi_attend_row(
                    qkv.data_ptr(), h, kv, d, None, None, 1e-6, 0, None, None,
                    k_cache.data_ptr(), v_cache.data_ptr(), seq, pos, first, d**-0.5,
                    out.data_ptr(), 1, half,
                )  # fmt: skip
                assert code == 0
                assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
                got = out.view(h, d).double()
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"{name} {pos}")


def test_attention_of_a_nan_score_is_nan(libs):
    """A NaN among a row's scores (a NaN key: the model overflowed) makes the head's output
    NaN, as softmax's exponentials of it are NaN, at positions taken 16 at a time too (the
    vector exponential once clamped a NaN to e^88.7: the head attended to that position
    alone and its output looked fine)."""
    h, kv, d, seq, pos = 2, 1, 16, 40, 20
    g = torch.Generator().manual_seed(3)
    for name, lib in libs:
        for bad in (3, 18):  # in the first 16 positions, and in the tail after them
            k_cache = torch.randn(kv, seq, d, generator=g)
            v_cache = torch.randn(kv, seq, d, generator=g)
            k_cache[0, bad, 0] = float("nan")
            qkv = torch.randn((h + 2 * kv) * d, generator=g)
            out = torch.zeros(h * d)
            code = lib.fermi_attend_row(
                qkv.data_ptr(), h, kv, d, None, None, 1e-6, 0, None, None,
                k_cache.data_ptr(), v_cache.data_ptr(), seq, pos, 0, 0.25, out.data_ptr(), 1, 0,
            )  # fmt: skip
            assert code == 0
            assert torch.isnan(out).all(), (name, bad)


def half_pair(name: str):
    """The same random decoder twice: with fp16 storage in fermi's kernels' layout (decode
    steps in them), and in float32 with every product's weight rounded to fp16 (torch's
    ops on the same values; a tied head gets its own rounded copy, as fp16 storage does)."""
    from torch import nn

    kernels = use_half_weights(random_decoder(CONFIGS[name]()), "native")
    ref = random_decoder(CONFIGS[name]())
    with torch.no_grad():
        if ref.cfg.tie_word_embeddings:
            ref.lm_head = nn.Linear(ref.cfg.hidden_size, ref.cfg.vocab_size, bias=False)
            ref.lm_head.weight.copy_(ref.model.embed_tokens.weight)
        for m in ref.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(m.weight.half().float())
    return kernels, ref


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count (what the one-call step takes) set to ``n`` meanwhile."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def steps(
    model, native_rows: bool, batch: int = 3, steps: int = 10, lengths=(7, 12, 3)
) -> list[torch.Tensor]:
    """Prefills of different lengths into slots 2, 0, 1, then batched decode steps, then a
    single row's steps: the logits of every step."""
    model.setup_cache(max_batch=3, max_seq_len=48)
    assert model.use_native_rows() == native_rows
    torch.manual_seed(5)
    slots, lengths = [2, 0, 1][:batch], list(lengths)[:batch]
    out, tokens = [], []
    with torch.inference_mode():
        for slot, n in zip(slots, lengths, strict=True):
            prompt = torch.randint(0, model.cfg.vocab_size, (1, n))
            logits = model(prompt, torch.arange(n)[None], torch.tensor([slot]), n, causal=True)
            out.append(logits)
            tokens.append(int(logits.argmax()))
        positions = list(lengths)
        for _ in range(steps):
            logits = model(
                torch.tensor(tokens)[:, None],
                torch.tensor(positions)[:, None],
                torch.tensor(slots),
                max(positions) + 1,
            )
            out.append(logits)
            tokens = logits.argmax(-1).tolist()
            positions = [p + 1 for p in positions]
        for _ in range(steps):  # the first row alone, as a lone stream decodes
            logits = model(
                torch.tensor([[tokens[0]]]),
                torch.tensor([[positions[0]]]),
                torch.tensor([slots[0]]),
                positions[0] + 1,
            )
            out.append(logits)
            tokens[0] = int(logits.argmax())
            positions[0] += 1
    return out


@needs_kernels
@pytest.mark.parametrize("name", ["qwen3", "llama_bias", "phi3_window", "smollm3_nope"])
def test_decode_steps_in_the_kernels_give_torchs_logits(name):
    """Tied head, q/k norms, biases, a sliding window (phi3_window: 8 positions, passed by
    the 22-step sequences) and NoPE layers: the same logits as torch's ops on the same fp16
    weights, step by step."""
    kernels, reference = half_pair(name)
    got, ref = steps(kernels, True), steps(reference, False)
    for a, b in zip(got, ref, strict=True):
        # Only the order of float32 sums differs: ~1e-6 of logits ~1.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3, 4, 8])
@pytest.mark.parametrize("name", ["qwen3", "phi3_window"])
def test_decode_steps_split_the_keys_among_threads(name, threads):
    """With more threads than (row, KV head) pairs share evenly, each pair's keys are split
    into parts that are merged afterwards (3 threads: 3 parts of one row's keys; 8 threads:
    4 parts, of which some hold no key at all after a one-token prompt): the same logits
    as torch's ops, as with one thread."""
    kernels, reference = half_pair(name)
    with torch_threads(threads):
        got = steps(kernels, True, lengths=(1, 12, 2))
    ref = steps(reference, False, lengths=(1, 12, 2))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", ["qwen3", "llama_bias", "phi3_window"])
def test_decode_steps_on_an_fp16_cache_give_torchs_logits(name, threads):
    """A model whose KV cache holds fp16 (``Decoder.cache_dtype``, as the CPU loaders set
    it under fp16 storage or quantization): the kernels write and read fp16 keys and values
    as torch's path does (rounded once as written, widened as read, a prompt's own keys
    rounded for its attention too): the same logits step by step, with the keys split
    among threads or not. And the cache does round: the logits move from a float32
    cache's."""
    kernels, reference = half_pair(name)
    kernels.cache_dtype = reference.cache_dtype = torch.float16
    with torch_threads(threads):
        got = steps(kernels, True, lengths=(1, 12, 2))
    assert kernels.model.layers[0].self_attn.cache.k.dtype == torch.float16
    ref = steps(reference, False, lengths=(1, 12, 2))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    reference.cache_dtype = None
    wide = steps(reference, False, lengths=(1, 12, 2))
    assert max((a - b).abs().max().item() for a, b in zip(ref, wide, strict=True)) > 1e-6


@needs_kernels
def test_the_cache_is_fp16_only_where_the_kernels_run_the_decode_step():
    """An fp16 cache (``cache_dtype``, as the CPU loaders set it) where fermi's kernels run
    the step; where torch's ops would (weights in another layout, the compiled runner),
    the runners keep a float32 cache, as those would widen the whole live cache every
    step."""
    from fermi.runners.torch_cpu_compiled import CompiledCpuRunner
    from fermi.runners.torch_eager import TorchRunner

    def cache_of(layout: str, runner) -> torch.dtype:
        model = use_half_weights(random_decoder(CONFIGS["qwen3"]()), layout)
        model.cache_dtype = torch.float16
        runner(model)
        return model.model.layers[0].self_attn.cache.k.dtype

    assert cache_of("native", lambda m: TorchRunner(m, 2, 32)) == torch.float16
    assert cache_of("plain", lambda m: TorchRunner(m, 2, 32)) == torch.float32
    compiled = lambda m: CompiledCpuRunner(m, 2, 32, warmup=False)  # noqa: E731
    assert cache_of("native", compiled) == torch.float32


@needs_kernels
@pytest.mark.parametrize(
    ("layout", "runner"), [("native", None), ("plain", None), ("native", "torch-compile")]
)
def test_the_cache_check_counts_the_dtype_the_runner_keeps(monkeypatch, layout, runner):
    """check_cache_fits runs before the runner allocates the cache: it must count the bytes
    of the cache the runner keeps, float32 where fermi's kernels do not run the step (a
    cache_dtype of fp16 counted there would pass a cache twice the size it checked, which
    on a CPU gets the process killed when it is written)."""
    from fermi import memory
    from fermi.runners.select import torch_runner

    checked = []
    monkeypatch.setattr(memory, "require_free", lambda need, *a, **k: checked.append(need))
    model = use_half_weights(random_decoder(CONFIGS["qwen3"]()), layout)
    model.cache_dtype = torch.float16
    torch_runner(model, runner, 2, 32, None, warmup=False)
    caches = [layer.self_attn.cache for layer in model.model.layers]
    allocated = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size()
                    for c in caches)  # fmt: skip
    assert checked == [allocated]  # the compiled runner's spare and rounded-up positions too
    cache = caches[0]
    kernels = layout == "native" and runner is None
    assert cache.k.dtype == (torch.float16 if kernels else torch.float32)


def one_layer_step(lib, k_cache, v_cache, x, pos, threads) -> torch.Tensor:
    """One decode step of one row (slot 0, at ``pos``) through a one-layer stack of h = kv
    = 1 head of d = hidden features whose q, k, v and o projections are the identity and
    whose MLP is zero: x + softmax(q . keys * scale) . values, q = k = v = rms_norm(x)."""
    d = x.shape[0]
    eye, zero = torch.eye(d), torch.zeros(32, d)
    blocks = [native_block(w) for w in (torch.cat([eye, eye, eye]), eye, zero, zero.T)]
    ones = torch.ones(d)
    layer = native.Layer()
    for i, b in enumerate(blocks):
        layer.w[i] = native.Weight(b.data_ptr(), None, None, 0, native.FORMATS["fp16"])
    layer.norm1 = layer.norm2 = ones.data_ptr()
    layer.k_cache, layer.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
    layers = (native.Layer * 1)(layer)
    half = int(k_cache.dtype == torch.float16)
    stack = native.Stack(1, d, 1, 1, d, 16, 0, k_cache.shape[-2], half, 1e-6, d**-0.5, layers)
    out = x.clone()
    slots, positions = torch.zeros(1, dtype=torch.long), torch.tensor([pos])
    code = lib.fermi_decode_rows(
        ctypes.byref(stack), out.data_ptr(), 1, slots.data_ptr(), positions.data_ptr(),
        None, None, None, None, threads,
    )  # fmt: skip
    assert code == 0
    return out


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_a_key_of_score_minus_inf_alone_in_a_part_weighs_nothing(libs, threads):
    """A key whose score is -inf has softmax's weight 0, also where it is the only key of
    a part of the split keys (2 threads, one row at position 1: 2 parts of one key; 8: 8
    parts, 6 of them empty): it once made the part's exponentials e^(-inf + inf), NaN, and
    the head's output with them. A NaN key alone in a part still makes the output NaN."""
    d = 16
    x = torch.linspace(0.5, 2.0, d)  # q's features all > 0: q . [-inf, 0...] = -inf
    expected = x + x * torch.rsqrt(x.pow(2).mean() + 1e-6)  # attends to position 1 alone
    for name, lib in libs:
        for bad, want_nan in ((float("-inf"), False), (float("nan"), True)):
            k_cache, v_cache = torch.zeros(1, 1, 8, d), torch.randn(1, 1, 8, d)
            k_cache[0, 0, 0, 0] = bad
            got = one_layer_step(lib, k_cache, v_cache, x, 1, threads)
            if want_nan:
                assert torch.isnan(got).all(), (name, threads)
            else:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


class RoundedInputsLinear(torch.nn.Module):
    """A native int8 or int4 layer's product in torch's ops: its inputs rounded as
    ``rounded_inputs`` says times (codes * scales), plus (int4) the unrounded inputs times
    the minimums."""

    def __init__(self, layer) -> None:
        super().__init__()
        w = layer.weight_as_stored()
        self.block = w.group_size if w.scheme == "int4" else INT8_BLOCK
        full = w.dequantize()
        self.mins = None if w.mins is None else w.mins.repeat_interleave(w.group_size, dim=1)
        self.codes_part = full if self.mins is None else full - self.mins
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(rounded_inputs(x, self.block), self.codes_part, self.bias)
        return y if self.mins is None else y + F.linear(x, self.mins)


def quant_pair(name: str, scheme: str):
    """A random decoder quantized (``scheme`` layers, int8 head) in the kernels' panels, and
    a copy whose products are torch's ops on the same values (RoundedInputsLinear)."""
    import copy

    from fermi.models.quant import QuantLinear, QuantSpec, quantize_decoder

    kernels = random_decoder(CONFIGS[name]())
    quantize_decoder(kernels, QuantSpec(scheme))
    ref = copy.deepcopy(kernels)
    with torch.no_grad():
        for path, module in list(ref.named_modules()):
            if isinstance(module, QuantLinear):
                assert module.layout == "native"
                ref.set_submodule(path, RoundedInputsLinear(module))
    return kernels, ref


@needs_kernels
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", ["qwen3", "llama_bias"])
def test_quantized_decode_steps_in_the_kernels_give_torchs_logits(name, scheme):
    """Every layer's int8 or int4 products (and the int8 head) inside the one-call decode
    step and the prompt's products: torch's logits on the weights the codes stand for."""
    kernels, reference = quant_pair(name, scheme)
    got, ref = steps(kernels, True), steps(reference, False)
    # The kernels round each block of inputs to int16 steps, and an input that differs
    # from torch's by float32 noise can land on the neighbouring step (measured: the
    # largest difference 2e-4 of the mean |logit|, int4 and int8, both models); greedy
    # tokens must agree at every step.
    atol = 5e-4 * torch.cat(ref).abs().mean().item()
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@needs_kernels
def test_models_the_kernels_cannot_express_keep_torchs_path():
    for name in ("gemma2", "gemma3", "granite"):
        model = use_half_weights(random_decoder(CONFIGS[name]()), "native")
        model.setup_cache(max_batch=1, max_seq_len=16)
        assert not model.use_native_rows(), name
    fp32 = random_decoder(CONFIGS["qwen3"]())  # float32 nn.Linear weights
    fp32.setup_cache(max_batch=1, max_seq_len=16)
    assert not fp32.use_native_rows()


@needs_kernels
def test_a_step_wider_than_native_rows_takes_torchs_layers(monkeypatch):
    from fermi.models import decoder as decoder_module

    model = use_half_weights(random_decoder(CONFIGS["llama_bias"]()), "native")
    model.setup_cache(max_batch=4, max_seq_len=16)
    assert model.use_native_rows()
    monkeypatch.setattr(decoder_module, "NATIVE_ROWS", 2)
    calls = []
    original = type(model)._native_layers

    def spy(self, x, ctx):
        calls.append(x.shape[0])
        return original(self, x, ctx)

    monkeypatch.setattr(type(model), "_native_layers", spy)
    with torch.inference_mode():
        for rows in (1, 2, 3):
            model(
                torch.full((rows, 1), 3),
                torch.zeros(rows, 1, dtype=torch.long),
                torch.arange(rows),
                1,
            )
    assert calls == [1, 2]


@needs_kernels
def test_half_weight_linear_takes_any_rows_and_keeps_its_weight():
    from torch import nn

    torch.manual_seed(3)
    plain = nn.Linear(50, 37)
    half = HalfWeightLinear(plain, [None], "native")
    assert half.layout == "native" and not half.packed
    torch.testing.assert_close(half.weight, plain.weight.detach().half(), rtol=0, atol=0)
    assert half.bias is not None and torch.equal(half.bias, plain.bias.detach())
    w = plain.weight.detach().half().double()
    for shape in ((1, 1, 50), (2, 5, 50), (1, 40, 50)):
        x = torch.randn(shape)
        with torch.inference_mode():
            got = half(x)
        assert got.dtype == torch.float32 and got.shape == (*shape[:-1], 37)
        ref = x.double() @ w.T + plain.bias.detach().double()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="50 input features"):
        half(torch.randn(1, 1, 49))
    with pytest.raises(ValueError, match="native layout"):
        HalfWeightLinear(plain, [None], "plain").row(torch.randn(1, 1, 50))
    with pytest.raises(ValueError, match="layout"):
        HalfWeightLinear(plain, [None], "bf16")


def _layout_in_child(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from fermi.models.half_weights import best_layout; print(best_layout())"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("value", ["off", "false", "2"])
def test_a_fermi_native_value_other_than_0_or_1_is_refused_naming_it(value):
    """Only "0" turned the kernels off: "off" or "false" left them on, silently."""
    bad = _layout_in_child({"FERMI_NATIVE": value})
    assert bad.returncode != 0
    assert f"ValueError: FERMI_NATIVE must be 0 or 1, got {value!r}" in bad.stderr


@needs_kernels
def test_without_a_compiler_or_when_turned_off_the_cpu_keeps_torchs_kernels(tmp_path):
    """FERMI_NATIVE=0, or no compiler and nothing built yet: the loader falls back to
    FBGEMM's packs (x86), saying why once."""
    off = _layout_in_child({"FERMI_NATIVE": "0"})
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "fbgemm"
    assert "FERMI_NATIVE=0" in off.stderr
    missing = _layout_in_child(
        {"CC": str(tmp_path / "no-such-cc"), "FERMI_NATIVE_CACHE": str(tmp_path / "cache")}
    )
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.strip() == "fbgemm"
    assert "CPU kernels are unavailable" in missing.stderr and "no C compiler" in missing.stderr
    broken = tmp_path / "cc"
    broken.write_text(
        "#!/bin/sh\necho 'cc (fake) 1.0'\n[ \"$1\" = --version ] && exit 0\n"
        "echo 'error: no such flag' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    failed = _layout_in_child({"CC": str(broken), "FERMI_NATIVE_CACHE": str(tmp_path / "cache2")})
    assert failed.stdout.strip() == "fbgemm"
    assert "no such flag" in failed.stderr


@needs_kernels
def test_a_cache_folder_that_cannot_be_written_keeps_torchs_kernels_naming_the_variable(
    tmp_path,
):
    """A service account's HOME (/nonexistent) or a read-only home: the warning said only
    "[Errno 13] Permission denied: '/nonexistent'", not how to keep the kernels."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    child = _layout_in_child({"FERMI_NATIVE_CACHE": str(blocker / "cache")})
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "fbgemm"
    assert "CPU kernels are unavailable" in child.stderr
    assert f"cannot write their cache {blocker / 'cache'}" in child.stderr
    assert "set FERMI_NATIVE_CACHE to a writable folder" in child.stderr


@needs_kernels
def test_a_second_process_loads_the_built_library_without_compiling(tmp_path):
    cache = tmp_path / "cache"
    first = _layout_in_child({"FERMI_NATIVE_CACHE": str(cache)})
    assert first.stdout.strip() == "native", first.stderr
    built = list(cache.glob("kernels-*.so"))
    assert len(built) == 1
    # A compiler that fails would break a rebuild: the second process must not need one.
    again = _layout_in_child({"FERMI_NATIVE_CACHE": str(cache), "CC": str(tmp_path / "none")})
    assert again.stdout.strip() == "native", again.stderr


def drive(chooser, seconds_of, steps: int, rows: int = 1) -> list[int]:
    """Run ``steps`` decode steps through ``chooser``, each taking ``seconds_of(count)``."""
    used = []
    for _ in range(steps):
        count = chooser.next()
        used.append(count)
        chooser.record(rows, seconds_of(count))
    return used


def test_decode_threads_follow_whichever_count_is_faster_now():
    from fermi.runners.torch_eager import DecodeThreads

    chooser = DecodeThreads(2, 1)
    quiet = {2: 0.006, 1: 0.012}.get  # a second idle core halves the step
    used = drive(chooser, quiet, 600)
    assert chooser.chosen == 2 and used[-100:].count(2) >= 99
    # Probes thin out while the choice holds: at most one step in 100 on the other count.
    assert chooser.interval == 256
    busy = {2: 0.080, 1: 0.012}.get  # another process took the second core
    used = drive(chooser, busy, 600)
    assert chooser.chosen == 1
    assert used[-300:].count(2) <= 300 // 256 + 1
    drive(chooser, quiet, 2000)  # the neighbour left
    assert chooser.chosen == 2


def test_decode_threads_weigh_the_rare_slow_step():
    """Two threads are usually a little faster but now and then wait for a descheduled
    partner: the total time decides, not the typical step."""
    import random

    from fermi.runners.torch_eager import DecodeThreads

    chooser = DecodeThreads(2, 1, first=1, last=1)
    rng = random.Random(0)
    # One step in four on two threads waits: median 0.009 s, mean 0.027 s.
    drive(
        chooser,
        lambda count: (0.080 if rng.random() < 0.25 else 0.009) if count == 2 else 0.012,
        600,
    )
    assert chooser.chosen == 1
    # Only like-for-like pairs count: steps of other row counts are not compared.
    other = DecodeThreads(2, 1, first=1, last=1)
    for rows, seconds in [(1, 0.001), (4, 0.050)] * 20:
        other.next()
        other.record(rows, seconds)
    assert not other.pairs and other.chosen == 2


@needs_kernels
def test_the_engine_decodes_on_a_measured_thread_count(monkeypatch):
    import fermi
    from fermi.runners import select

    monkeypatch.setattr(select, "use_default_cpu_threads", lambda: (2, 1))
    engine = fermi.load("smollm2-135m", device="cpu", max_batch=2, max_seq_len=256)
    try:
        chooser = engine.runner.decode_threads
        assert chooser is not None and chooser.counts == (2, 1)
        out = engine.generate(prompt="Hi", max_tokens=40, temperature=0, ignore_eos=True)
        assert len(out.token_ids) == 40
        assert chooser.pairs  # probes ran, timed like for like
    finally:
        engine.close()


def native_layer(kind: str, n: int, k: int):
    """A layer of ``n`` outputs and ``k`` inputs (with a bias) in the kernels' ``kind`` panels:
    fp16 (``HalfWeightLinear``), int8 or int4 (``QuantLinear``)."""
    from torch import nn

    from fermi.models.quant import QuantLinear

    if kind == "fp16":
        return HalfWeightLinear(nn.Linear(k, n), [None], "native")
    q = (quantize_int8 if kind == "int8" else quantize_int4)(torch.randn(n, k))
    return QuantLinear(q, torch.randn(n), "cpu", torch.float32, layout="native")


@needs_kernels
@pytest.mark.parametrize("kind", ["fp16", "int8", "int4"])
def test_a_copied_layer_names_itself_to_the_compiled_product(kind):
    """Compiled code finds a layer's weight by the number in its ``_handle`` buffer: a copy
    (copy.deepcopy, pickle) must name the copy, not the layer it was copied from (which may
    be gone, or hold other weights)."""
    import copy
    import gc
    import pickle

    from fermi.models.half_weights import _PACKED, native_linear

    torch.manual_seed(11)
    layer = native_layer(kind, 40, 64)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        want = layer(x)
    copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), copy.copy(layer)]
    del layer
    gc.collect()
    for c in copies:
        assert _PACKED[int(c._handle)] is c
        with torch.inference_mode():
            torch.testing.assert_close(native_linear(x, c._handle, 40), want, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("kind", ["fp16", "int8", "int4"])
def test_a_layer_whose_storage_moves_reads_its_weights_where_they_are_now(kind):
    """``Module.share_memory()`` (torch.multiprocessing does it to the tensors it sends)
    moves each tensor's storage into shared memory and frees the old one: the kernels must
    read the weights at their new addresses, not the freed ones."""
    torch.manual_seed(12)
    layer = native_layer(kind, 64, 256)
    x = torch.randn(3, 256)
    with torch.inference_mode():
        want, want_row = layer(x), layer.row(x[:1])
        layer.share_memory()
        # (new allocations land where the old storages were, as they would in a server)
        _fill = [torch.full((64 * 256,), 7, dtype=torch.uint8) for _ in range(64)]
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
        torch.testing.assert_close(layer.row(x[:1]), want_row, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("scheme", ["fp16", "int4"])
def test_decode_steps_after_the_tensors_moved_read_them_where_they_are_now(scheme):
    """The decoder's structure for the one-call step holds its tensors' addresses: after
    ``share_memory()`` (which frees the old storages) it must be built anew."""
    from fermi.models.quant import QuantSpec, quantize_decoder

    def model():
        m = random_decoder(CONFIGS["llama_bias"]())
        if scheme == "fp16":
            use_half_weights(m, "native")
        else:
            quantize_decoder(m, QuantSpec(scheme))
        m.setup_cache(max_batch=1, max_seq_len=16)
        assert m.use_native_rows()
        return m

    def run(m, share: bool) -> list[torch.Tensor]:
        out = []
        with torch.inference_mode():
            m(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], torch.tensor([0]), 3, causal=True)
            for p in (3, 4, 5):
                if share and p == 4:
                    m.share_memory()
                    _fill = [torch.full((4096,), 9.0) for _ in range(300)]
                out.append(m(torch.tensor([[p]]), torch.tensor([[p]]), torch.tensor([0]), p + 1))
        return out

    for got, want in zip(run(model(), True), run(model(), False), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _native_decoder(scheme: str):
    from fermi.models.quant import QuantSpec, quantize_decoder

    m = random_decoder(CONFIGS["qwen3"]())
    if scheme == "fp16":
        use_half_weights(m, "native")
    else:
        quantize_decoder(m, QuantSpec(scheme))
    return m


def _native_buffers(m) -> dict[str, torch.Tensor]:
    from fermi.models.quant import QuantLinear

    kinds = (QuantLinear, HalfWeightLinear)
    return {
        f"{path}.{name}": t
        for path, layer in m.named_modules()
        if isinstance(layer, kinds) and layer.native_weight is not None
        for name, t in layer._buffers.items()
        if t is not None and name != "_handle"
    }


@needs_kernels
@pytest.mark.parametrize("scheme", ["fp16", "int8", "int4"])
def test_a_decoder_in_the_kernels_copies_and_converts_without_losing_its_formats(scheme):
    """copy.deepcopy after use_native_rows gives a decoder that steps like the original;
    model.to(bf16) leaves the kernels' buffers in their formats (fp16 codes turned bf16
    would be other numbers) with the layers' NativeWeights on those very buffers (not on
    the tensors they replaced: no second copy), and the one-call step off (the norms are
    no longer float32); a move off the CPU turns it off too."""
    import copy

    m = _native_decoder(scheme)
    want = steps(m, True, steps=3)
    twin = copy.deepcopy(m)
    assert twin.native_rows
    for a, b in zip(steps(twin, True, steps=3), want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    before = {k: (t.dtype, t.clone()) for k, t in _native_buffers(m).items()}
    m.to(torch.bfloat16)
    after = _native_buffers(m)
    for key, (dtype, values) in before.items():
        assert after[key].dtype == dtype and torch.equal(after[key], values), key
    for layer in m.modules():
        w = getattr(layer, "native_weight", None)
        if w is not None:
            held = [t for t in (w.codes, w.scales, w.mins, w.bias) if t is not None]
            assert all(any(t is b for b in layer._buffers.values()) for t in held)
    assert m.dtype == torch.bfloat16 and not m.native_rows
    assert not m.use_native_rows()

    moved = _native_decoder(scheme)
    moved.setup_cache(max_batch=1, max_seq_len=8)
    assert moved.use_native_rows()
    moved.to("meta")
    assert not moved.native_rows


@needs_kernels
def test_a_native_layer_refuses_tensors_off_the_cpu_and_a_missing_library(monkeypatch):
    from fermi.models.quant import QuantLinear

    q = quantize_int4(torch.randn(16, 64), 32)
    layer = QuantLinear(q, None, "cpu", torch.float32)
    with pytest.raises(ValueError, match="CPU tensors only"):
        layer(torch.empty(2, 64, device="meta"))  # (a device whose addresses C cannot read)
    monkeypatch.setattr(native, "available", lambda: False)
    with pytest.raises(ValueError, match="do not load here"):
        QuantLinear(q, None, "cpu", torch.float32, layout="native")
    assert QuantLinear(q, None, "cpu", torch.float32).layout == "torch"
