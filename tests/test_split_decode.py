"""The Triton split-KV decode kernel against attention spelled out in float32 (on the GPU,
and in Triton's interpreter on the CPU), how many key ranges it cuts, and the ordering of its
merge in the PTX it compiles to (Triton only)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch


def reference(q, keys, values, positions, window, scale, softcap):
    g = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(g, dim=1)
    v = values.float().repeat_interleave(g, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, H, 1, L]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    key_pos = torch.arange(keys.shape[2], device=q.device)
    pos = positions.view(-1, 1, 1, 1)
    visible = key_pos <= pos
    if window:
        visible = visible & (key_pos > pos - window)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return probs @ v


CASES = [
    # heads, kv heads, head dim, cache length, window, softcap, scale (None: 1/sqrt(head dim))
    (16, 8, 128, 384, None, None, None),  # Qwen3-1.7B
    (32, 8, 128, 2560, None, None, None),  # Qwen3-8B, long
    (9, 3, 64, 300, None, None, None),  # SmolLM2: groups of 3, a length off the block size
    (32, 32, 96, 777, None, None, None),  # Phi-3.5: head dim 96, no grouping
    (8, 4, 256, 1000, 64, 50.0, None),  # Gemma 2: window and soft-capping
    (4, 1, 256, 1000, 512, None, 1 / 16),  # Gemma 3 1B: one KV head, window 512
    (32, 8, 64, 300, None, None, 0.015625),  # Granite 3.3 2B: attention_multiplier
    (24, 8, 128, 600, None, None, None),  # Phi-4-mini: groups of 3
    (2, 1, 16, 5, None, None, None),  # tiny
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h", "hkv", "d", "length", "window", "softcap", "scale"), CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
def test_split_kernel_equals_reference(h, hkv, d, length, window, softcap, scale, dtype):
    from fermi.models.split_decode import counters_for, split_decode_attention

    g = torch.Generator(device="cuda").manual_seed(length)
    cache = 4 + length  # a view of a longer cache, as the runner passes it
    kw = {"device": "cuda", "generator": g}
    q = torch.randn(4, h, 1, d, **kw).to(dtype)
    k_all = torch.randn(5, hkv, cache, d, **kw).to(dtype)
    v_all = torch.randn(5, hkv, cache, d, **kw).to(dtype)
    keys, values = k_all[:4, :, :length], v_all[:4, :, :length]
    # rows at the start, middle and end of the attended length, and a padding row whose
    # position lies past it (the runner's scratch position)
    positions = torch.tensor([[0], [length // 2], [length - 1], [cache - 1]], device="cuda")
    scale = scale or d**-0.5
    counters = counters_for(5, hkv, "cuda")
    want = reference(q, keys, values, positions, window, scale, softcap)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for _ in range(3):  # the counters must be left at zero for the next call
        got = split_decode_attention(q, keys, values, positions, window, scale, softcap, counters)
        assert got.dtype == dtype and got.shape == q.shape
        assert (got.float() - want).abs().max().item() < tol
        assert not counters.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
def test_a_wide_batch_gives_each_row_one_range_written_directly(dtype):
    """130 rows of Qwen3-1.7B's heads: the pairs alone fill the GPU, so each (row, KV head)
    is one range over several key blocks, and its program writes the output itself."""
    from fermi.models.split_decode import counters_for, key_ranges, split_decode_attention

    rows, h, hkv, d, length = 130, 16, 8, 128, 384
    assert key_ranges(rows * hkv, length) == (1, length)
    g = torch.Generator(device="cuda").manual_seed(7)
    kw = {"device": "cuda", "generator": g}
    q = torch.randn(rows, h, 1, d, **kw).to(dtype)
    keys = torch.randn(rows, hkv, length, d, **kw).to(dtype)
    values = torch.randn(rows, hkv, length, d, **kw).to(dtype)
    positions = torch.randint(0, length, (rows, 1), **kw)
    counters = counters_for(rows, hkv, "cuda")
    want = reference(q, keys, values, positions, None, d**-0.5, None)
    got = split_decode_attention(q, keys, values, positions, None, d**-0.5, None, counters)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want).abs().max().item() < tol
    assert not counters.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
def test_split_kernel_compiles_with_a_symbolic_length_and_captures():
    from fermi.models.split_decode import counters_for, split_decode_attention

    counters = counters_for(1, 4, "cuda")

    def attend(q, keys, values, positions):
        return split_decode_attention(q, keys, values, positions, None, 0.125, None, counters)

    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    cache = torch.randn(2, 2, 4, 600, 64, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    for length in (256, 384, 512):
        pos = torch.tensor([[length - 3]], device="cuda")
        keys, values = cache[0, :1, :, :length], cache[1, :1, :, :length]
        want = reference(q, keys, values, pos, None, 0.125, None)
        assert (compiled(q, keys, values, pos).float() - want).abs().max().item() < 2e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(q, keys, values, pos)
    q.copy_(torch.randn_like(q))
    for _ in range(3):
        graph.replay()
    want = reference(q, keys, values, pos, None, 0.125, None)
    assert (out.float() - want).abs().max().item() < 2e-2
    assert not counters.any()


@pytest.mark.parametrize(("g", "d", "dtype"), [(2, 128, "bf16"), (1, 96, "bf16"), (4, 64, "fp32")])
def test_every_threads_partials_are_ordered_before_the_counters_release(g, d, dtype):
    """The merge reads what every thread of every range stored; the counter's release is
    made by one thread and covers only what it has seen, so a CTA barrier must sit between
    the partials' last global store and the atomic add. Compiled to PTX for sm_90 (needs
    Triton, not a GPU)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fermi.models import split_decode as S

    kernel = S._partials_kernel
    dp = max(16, S._pow2(d))
    consts = {
        "KV_HEADS": 8, "G": g, "GP": max(16, S._pow2(g)), "D": d, "DP": dp,
        "BLOCK": S.BLOCK_N, "SPLIT_COUNT": S.SPLITS, "CHUNK": min(256, S._pow2(g * d)),
        "HAS_WINDOW": False, "HAS_SOFTCAP": False, "IEEE": dtype == "fp32",
    }  # fmt: skip
    ptrs = dict.fromkeys(("Q", "K", "V", "OUT"), f"*{dtype}")
    ptrs |= {"POS": "*i64", "ACC": "*fp32", "M": "*fp32", "L": "*fp32", "COUNT": "*i32"}
    signature = {
        name: ptrs.get(name)
        or ("constexpr" if name in consts else "fp32" if name in ("scale", "softcap") else "i32")
        for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    options = {"num_warps": 4, "num_stages": 2}
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    lines = ptx.splitlines()
    add = next(i for i, line in enumerate(lines) if "atom.global" in line and ".add." in line)
    last_store = max(i for i, line in enumerate(lines[:add]) if "st.global" in line)
    assert any("bar.sync" in line or "barrier.sync" in line for line in lines[last_store:add])


@pytest.mark.parametrize(
    ("pairs", "length", "block", "want"),
    [
        (8, 2048, 64, 32),  # batch 1, 8 KV heads, long: the most ranges
        (8, 256, 64, 4),  # batch 1, short: no more ranges than blocks of keys
        (8, 5, 64, 1),
        (64, 2048, 64, 8),  # batch 8: 512 programs
        (1024, 256, 64, 1),  # batch 128: the pairs alone fill the GPU
        (600, 4096, 64, 1),
        (4, 1000, 32, 32),  # Gemma 2's 256-wide heads take 32-key blocks
    ],
)
def test_the_split_count_fills_the_gpu_with_no_more_ranges_than_blocks(pairs, length, block, want):
    from fermi.models.split_decode import TARGET_PROGRAMS, split_count

    got = split_count(pairs, length, block)
    assert got == want
    assert pairs * got >= min(TARGET_PROGRAMS, pairs * -(-length // block)) or got == 32
    assert (got - 1) * block < length


def test_the_split_count_stays_symbolic_under_dynamic_shapes():
    """Compiled with dynamic shapes, the count is an expression of the batch and the length:
    tracing it adds no guard, so one compiled graph serves every batch and cache bucket."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fermi.models.split_decode import split_count

    env = ShapeEnv()
    rows = env.create_unbacked_symint()
    length = env.create_unbacked_symint()
    count = split_count(rows * 8, length)
    assert isinstance(count, torch.SymInt)
    assert not env.guards


def run_script(code: str, **env: str) -> list[str]:
    """Run ``code`` in a Python process of its own from the repository's root (Triton and
    Dynamo state stay out of pytest's process) and return its output lines; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


INTERPRETED = textwrap.dedent(
    """
    import torch
    from fermi.models import split_decode as S
    from tests.test_split_decode import reference

    # heads, KV heads, head dim, length, window, softcap, rows: one range each (written
    # directly, no merge), 17 ranges where 32 were wanted (rounding to whole blocks), groups
    # of 3 over 5 ranges, 256-wide heads with a window and soft-capping, a tiny one
    cases = [
        (4, 2, 16, 60, None, None, 3),
        (2, 1, 16, 2100, None, None, 1),
        (9, 3, 64, 300, None, None, 2),
        (4, 2, 256, 130, 32, 50.0, 1),
        (2, 1, 16, 5, None, None, 1),
    ]
    for h, hkv, d, length, window, softcap, b in cases:
        g = torch.Generator().manual_seed(length)
        q = torch.randn(b, h, 1, d, generator=g)
        keys = torch.randn(b, hkv, length + 4, d, generator=g)[:, :, :length]
        values = torch.randn(b, hkv, length + 4, d, generator=g)[:, :, :length]
        positions = torch.randint(0, length, (b, 1), generator=g)
        positions[0, 0] = length - 1
        counters = torch.zeros(b * hkv, dtype=torch.int32)
        scale = d**-0.5
        want = reference(q, keys, values, positions, window, scale, softcap)
        ranges = S.key_ranges(b * hkv, length, 64 if d <= 128 else 32)[0]
        # A second call checks that the merge left its counters at zero; one range uses none.
        for _ in range(2 if ranges > 1 else 1):
            got = S.split_decode(
                q, keys, values, positions, counters, window or 0, scale, float(softcap or 0)
            )
            err = (got - want).abs().max().item()
            assert err < 1e-5, (h, hkv, d, length, b, err)
            assert not counters.any()
        print("ok", b * hkv, length, ranges)

    # One range over several key blocks (the op cuts one range only from 512 pairs up, which
    # the interpreter would take long over), launched directly: 2 rows x 2 KV heads, 200
    # keys in 4 blocks. Partials poisoned with NaN stay NaN: the program wrote its output
    # itself, without the merge.
    b, h, hkv, d, length = 2, 4, 2, 16, 200
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, h, 1, d, generator=g)
    keys = torch.randn(b, hkv, length, d, generator=g)
    values = torch.randn(b, hkv, length, d, generator=g)
    positions = torch.tensor([[length - 1], [130]])
    counters = torch.zeros(b * hkv, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    acc = torch.full((b * hkv, h // hkv, d), float("nan"))
    m, l_sum = acc[:, :, 0].clone(), acc[:, :, 0].clone()
    S._partials_kernel[(b * hkv, 1)](
        q, keys, values, positions, acc, m, l_sum, counters, out,
        q.stride(0), q.stride(1), q.stride(3),
        *keys.stride(), *values.stride(), positions.stride(0),
        length, 256, 1, 0, d**-0.5, 0.0,
        KV_HEADS=hkv, G=h // hkv, GP=16, D=d, DP=16, BLOCK=64, SPLIT_COUNT=32,
        CHUNK=h // hkv * d, HAS_WINDOW=False, HAS_SOFTCAP=False, IEEE=True,
    )  # fmt: skip
    want = reference(q, keys, values, positions, None, d**-0.5, None)
    assert (out - want).abs().max().item() < 1e-5
    assert acc.isnan().all() and m.isnan().all() and l_sum.isnan().all()
    assert not counters.any()
    print("direct", b * hkv, length)
    """
)


def test_the_kernel_equals_the_reference_in_tritons_interpreter():
    """The kernel's own code (ranges, masks, the counter's merge) run by Triton's interpreter
    on CPU tensors, so CI checks what the GPU runs without one; the GPU tests above check
    the compiled kernel. (torch 2.11's ``wrap_triton`` refuses an interpreted kernel: on a
    GPU host the compiled kernel's tests stand in.)"""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the GPU tests above run the compiled kernel itself")
    lines = run_script(INTERPRETED, TRITON_INTERPRET="1")
    ranges = [line.split()[-1] for line in lines if line.startswith("ok")]
    assert ranges == ["1", "17", "5", "5", "1"]
    assert "direct 4 200" in lines


ONE_GRAPH = textwrap.dedent(
    """
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from fermi.models import split_decode as S

    graphs = []

    class Traced(Exception):
        pass

    def traced(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Traced

        return run

    @torch.compile(backend=aot_autograd(fw_compiler=traced), fullgraph=True)
    def attend(q, keys, values, positions, counters):
        return S.split_decode(q, keys, values, positions, counters, 0, 0.25, 0.0)

    counters = torch.zeros(520, dtype=torch.int32)
    # rows, cache length: 32 ranges, one range (the rows fill the GPU), 3 of 4, 32
    for b, length in [(2, 2048), (520, 70), (128, 300), (4, 4000)]:
        q = torch.randn(b, 3, 1, 16)
        keys = torch.randn(b, 1, length, 16)
        positions = torch.randint(0, length, (b, 1))
        for t in (q, keys, positions):
            torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(keys, 2)
        try:
            attend(q, keys, keys, positions, counters)
        except Traced:
            pass
        print("ranges", S.key_ranges(b, length)[0])
    print("graphs", len(graphs))
    """
)


def test_one_compiled_graph_serves_one_key_range_and_many():
    """Compiled as the model is (batch and cache length dynamic), a batch cut into one key
    range per row and batches cut into many share one graph: no tensor's size is 1 only
    because the range count is, which would add a guard, and a second compile at wide
    batches. The graphs are traced through AOT autograd as Inductor's are, not run (a CPU
    host cannot launch the kernel); in a process of its own, as Triton is imported."""
    pytest.importorskip("triton")
    lines = run_script(ONE_GRAPH)
    assert "graphs 1" in lines, lines
    assert [line for line in lines if line.startswith("ranges")] == [
        "ranges 32",
        "ranges 1",
        "ranges 3",
        "ranges 32",
    ]
