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
    from fermi.models.split_decode import counters_for, split_decode_attention, split_ranges

    rows, h, hkv, d, length = 130, 16, 8, 128, 384
    assert split_ranges(rows * hkv, d, 2) == 1 and split_ranges(rows * hkv, d, 4) == 1
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


@pytest.mark.parametrize(("rows", "length"), [(8, 384), (8, 2100), (16, 1000)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
def test_the_one_wave_launch_equals_the_reference(rows, length):
    """Qwen3-8B's heads at 8 and 16 rows (64 and 128 pairs): one range each over up to 17
    of the launch's 128-key blocks, read from a view of a longer cache."""
    from fermi.models import split_decode as S

    h, hkv, d = 32, 8, 128
    launches = S.launch_plan(rows * hkv, length, d, 2, S.multiprocessors("cuda"))
    if [launch for *_, launch in launches] != [S.ONE_WAVE_LAUNCH]:
        pytest.skip("this GPU has fewer multiprocessors than these pairs")
    g = torch.Generator(device="cuda").manual_seed(rows + length)
    kw = {"device": "cuda", "generator": g}
    q = torch.randn(rows, h, 1, d, **kw).bfloat16()
    cache = torch.randn(2, rows, hkv, length + 64, d, **kw).bfloat16()
    keys, values = cache[0, :, :, :length], cache[1, :, :, :length]
    positions = torch.randint(0, length, (rows, 1), **kw)
    positions[0, 0], positions[1, 0] = length - 1, 0
    counters = S.counters_for(rows, hkv, "cuda")
    want = reference(q, keys, values, positions, None, d**-0.5, None)
    got = S.split_decode_attention(q, keys, values, positions, None, d**-0.5, None, counters)
    assert (got.float() - want).abs().max().item() < 2e-2
    assert not counters.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
def test_one_compiled_program_launches_each_batch_by_its_rule():
    """Batch and length dynamic, as the runner compiles its wider decode step, through
    Inductor: 3 rows split their keys, 8 and 16 take the one-wave launch (on a GPU with the
    shared memory), 17 and 130 one range each with the usual launch. One compile serves them
    all and each equals the reference; then each replays right from a CUDA graph (where the
    launch with no pairs records no node)."""
    from torch._inductor.compile_fx import compile_fx

    from fermi.models.split_decode import counters_for, split_decode_attention

    h, hkv, d, length = 16, 8, 128, 640
    counters = counters_for(130, hkv, "cuda")
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return compile_fx(gm, example_inputs)

    def attend(q, keys, values, positions):
        return split_decode_attention(q, keys, values, positions, None, d**-0.5, None, counters)

    compiled = torch.compile(attend, backend=backend, fullgraph=True, dynamic=True)
    g = torch.Generator(device="cuda").manual_seed(5)
    kw = {"device": "cuda", "generator": g}
    # K and V apart, and a first batch of 3: Dynamo's duck sizing gives sizes that are equal
    # at the first compile one symbol, so a first batch of 2 beside a stacked (2, ...) cache
    # would tie the batch to 2 and compile again at 8 (seen: the guard
    # ``keys._base.size()[0] == q.size()[0]``). The runner compiles with a symbol per size.
    kcache = torch.randn(130, hkv, length + 1, d, **kw).bfloat16()
    vcache = torch.randn(130, hkv, length + 1, d, **kw).bfloat16()
    batches = {}
    for rows in (3, 8, 16, 17, 130):
        keys, values = kcache[:rows, :, :length], vcache[:rows, :, :length]
        q = torch.randn(rows, h, 1, d, **kw).bfloat16()
        positions = torch.randint(0, length, (rows, 1), **kw)
        want = reference(q, keys, values, positions, None, d**-0.5, None)
        assert (compiled(q, keys, values, positions).float() - want).abs().max().item() < 2e-2
        assert not counters.any()
        batches[rows] = (q, keys, values, positions)
    assert len(compiles) == 1
    for rows, (q, keys, values, positions) in batches.items():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(q, keys, values, positions)
        q.copy_(torch.randn(q.shape, **kw))
        graph.replay()
        want = reference(q, keys, values, positions, None, d**-0.5, None)
        assert (out.float() - want).abs().max().item() < 2e-2, rows
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
        "BLOCK": S.BLOCK_N, "SPLIT_COUNT": S.SPLITS, "SPLIT_P2": S.SPLITS,
        "CHUNK": min(256, S._pow2(g * d)),
        "HAS_WINDOW": False, "HAS_SOFTCAP": False, "IEEE": dtype == "fp32", "ONE_RANGE": False,
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


USUAL, USUAL_WIDE_HEADS = (64, 4, 2), (32, 4, 2)


@pytest.mark.parametrize(
    ("pairs", "length", "d", "size", "sms", "want"),
    [
        (8, 2048, 128, 2, 132, [(8, 32, 64, USUAL)]),  # batch 1: 32 ranges
        (8, 256, 128, 2, 132, [(8, 32, 64, USUAL)]),  # short: 4 ranges hold keys, 28 return
        (8, 5, 128, 2, 132, [(8, 32, 64, USUAL)]),
        (63, 2048, 128, 2, 132, [(63, 32, 64, USUAL)]),
        (64, 2048, 128, 2, 132, [(64, 1, 2048, "one wave")]),  # one range each, one wave
        (132, 300, 96, 2, 132, [(132, 1, 300, "one wave")]),  # Phi-3.5's 96-wide heads
        (133, 2048, 128, 2, 132, [(133, 1, 2048, USUAL)]),  # a second wave: the usual launch
        (1024, 256, 128, 2, 132, [(1024, 1, 256, USUAL)]),
        (64, 2048, 128, 2, 108, [(64, 1, 2048, "one wave")]),  # an A100's 108 multiprocessors
        (120, 2048, 128, 2, 108, [(120, 1, 2048, USUAL)]),
        # where neither rule was measured, splitting goes on up to 512 pairs
        (64, 2048, 128, 4, 132, [(64, 32, 64, USUAL)]),  # float32
        (511, 2048, 128, 4, 132, [(511, 32, 64, USUAL)]),
        (512, 2048, 128, 4, 132, [(512, 1, 2048, USUAL)]),
        (4, 1000, 256, 2, 132, [(4, 32, 32, USUAL_WIDE_HEADS)]),  # Gemma's: 32-key blocks
        (600, 1000, 256, 2, 132, [(600, 1, 1000, USUAL_WIDE_HEADS)]),
    ],
)
def test_the_launch_plan_by_pairs_dtype_and_heads(pairs, length, d, size, sms, want):
    from fermi.models.split_decode import ONE_WAVE_LAUNCH, SPLITS, launch_plan, split_ranges

    launches = launch_plan(pairs, length, d, size, sms)
    want = [(n, ranges, k, ONE_WAVE_LAUNCH if c == "one wave" else c) for n, ranges, k, c in want]
    assert launches == want
    ((_, ranges, keys, (block, _, _)),) = launches
    assert ranges == split_ranges(pairs, d, size)  # the partials the op allocates
    assert ranges == 1 or (keys * ranges >= length and keys % block == 0)
    assert ranges == 1 or (keys - block) * SPLITS < length  # no block more than needed


def test_the_launch_plan_stays_symbolic_under_dynamic_shapes():
    """With a symbolic batch every launch is listed, over pairs that add up to all of them,
    and tracing the plan adds no guard."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fermi.models.split_decode import ONE_WAVE_LAUNCH, SPLITS, launch_plan, split_ranges

    env = ShapeEnv()
    rows = env.create_unbacked_symint()
    length = env.create_unbacked_symint()
    launches = launch_plan(rows * 8, length, 128, 2, 132)
    assert [(count, launch) for _, count, _, launch in launches] == [
        (SPLITS, (64, 4, 2)), (1, ONE_WAVE_LAUNCH), (1, (64, 4, 2))
    ]  # fmt: skip
    assert all(isinstance(n, torch.SymInt) for n, *_ in launches)
    assert isinstance(split_ranges(rows * 8, 128, 2), torch.SymInt)
    assert len(launch_plan(rows, length, 256, 2, 132)) == 2  # 256-wide heads: no one wave
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

    # heads, KV heads, head dim, length, window, softcap, rows: 32 ranges each, of which
    # keys fill 1, 17 (rounding to whole blocks), 5 (groups of 3), 5 (256-wide heads with
    # a window and soft-capping, 32-key blocks) and 1 (a tiny one)
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
        ranges = S.split_ranges(b * hkv, d, 4)  # float32
        # A second call checks that the merge left its counters at zero.
        for _ in range(2):
            got = S.split_decode(
                q, keys, values, positions, counters, window or 0, scale, float(softcap or 0)
            )
            err = (got - want).abs().max().item()
            assert err < 1e-5, (h, hkv, d, length, b, err)
            assert not counters.any()
        block = 64 if d <= 128 else 32
        print("ok", b * hkv, length, ranges, -(-length // S.range_length(length, block)))

    # One range over several key blocks, launched as the op launches 64 to 132 pairs
    # (ONE_WAVE_LAUNCH's 128-key blocks; the op takes it for 2-byte elements only, and the
    # interpreter would take long over 64 pairs), then with the usual 64-key blocks, the
    # kernel compiled for one range (no merge code): 2 rows x 2 KV heads, 200 keys.
    # Partials poisoned with NaN stay NaN: the program wrote its output itself.
    b, h, hkv, d, length = 2, 4, 2, 16, 200
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, h, 1, d, generator=g)
    keys = torch.randn(b, hkv, length, d, generator=g)
    values = torch.randn(b, hkv, length, d, generator=g)
    positions = torch.tensor([[length - 1], [130]])
    counters = torch.zeros(b * hkv, dtype=torch.int32)
    want = reference(q, keys, values, positions, None, d**-0.5, None)
    for launch in [S.ONE_WAVE_LAUNCH, (64, 4, 2)]:
        out = torch.full_like(q, float("nan"))
        acc = torch.full((b * hkv, h // hkv, d), float("nan"))
        partials = (acc, acc[:, :, 0].clone(), acc[:, :, 0].clone())
        S._launch(S._partials_kernel, (b * hkv, 1), q, keys, values, positions, counters, out,
                  partials, 256, 0, d**-0.5, 0.0, launch)  # fmt: skip
        assert (out - want).abs().max().item() < 1e-5
        assert all(t.isnan().all() for t in partials)
        assert not counters.any()
        print("direct", b * hkv, length, launch[0])

    # The launches the op makes, recorded instead of run: 64 and 140 pairs of 2-byte
    # elements (one range each: the one-wave launch, then beyond 132 multiprocessors the
    # usual one), 6 pairs (32 ranges), and 64 pairs of float32 (32 ranges: one range each
    # was not measured there).
    made = []
    S._launch = lambda kernel, grid, *args: made.append((grid, args[-1]))
    for b, dtype in [(32, torch.bfloat16), (70, torch.bfloat16), (3, torch.bfloat16),
                     (32, torch.float32)]:  # fmt: skip
        q = torch.zeros(b, 4, 1, 16, dtype=dtype)
        kv = torch.zeros(b, 2, 200, 16, dtype=dtype)
        counters = torch.zeros(b * 2, dtype=torch.int32)
        S.split_decode(q, kv, kv, torch.zeros(b, 1, dtype=torch.long), counters, 0, 0.25, 0.0)
        print("launches", b * 2, str(dtype)[6:], *(f"{g[0]}x{g[1]}:{c[0]}/{c[1]}" for g, c in made))
        made.clear()
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
    ranges = [line.split()[-2:] for line in lines if line.startswith("ok")]
    assert ranges == [["32", "1"], ["32", "17"], ["32", "5"], ["32", "5"], ["32", "1"]]
    assert "direct 4 200 128" in lines and "direct 4 200 64" in lines
    assert [line for line in lines if line.startswith("launches")] == [
        "launches 64 bfloat16 64x1:128/8",
        "launches 140 bfloat16 140x1:64/4",
        "launches 6 bfloat16 6x32:64/4",
        "launches 64 float32 64x32:64/4",
    ]


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
    # rows (one KV head: rows are pairs), cache length: 32 ranges, one range with the usual
    # launch, 32, 32, one range with the one-wave launch.
    # bfloat16, so that the one-wave launch is a choice the trace must keep symbolic.
    for b, length in [(2, 2048), (520, 70), (60, 600), (4, 4000), (100, 500)]:
        q = torch.randn(b, 3, 1, 16, dtype=torch.bfloat16)
        keys = torch.randn(b, 1, length, 16, dtype=torch.bfloat16)
        positions = torch.randint(0, length, (b, 1))
        for t in (q, keys, positions):
            torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(keys, 2)
        try:
            attend(q, keys, keys, positions, counters)
        except Traced:
            pass
        launches = S.launch_plan(b, length, 16, 2, S.multiprocessors("cpu"))
        ranges = launches[0][1]
        kinds = ("wave" if launch == S.ONE_WAVE_LAUNCH else "usual" for *_, launch in launches)
        print("ranges", ranges, *kinds)
    print("graphs", len(graphs))
    """
)


def test_one_compiled_graph_serves_one_key_range_and_many():
    """Compiled as the model is (batch and cache length dynamic), a batch cut into one key
    range per row, batches cut into many and a batch in the one-wave launch share one graph:
    no tensor's size is 1 only because the range count is, and no launch's choice is a
    guard, either of which would compile again. The graphs are traced through AOT autograd
    as Inductor's are, not run (a CPU host cannot launch the kernel); in a process of its
    own, as Triton is imported."""
    pytest.importorskip("triton")
    lines = run_script(ONE_GRAPH)
    assert "graphs 1" in lines, lines
    assert [line for line in lines if line.startswith("ranges")] == [
        "ranges 32 usual",
        "ranges 1 usual",
        "ranges 32 usual",
        "ranges 32 usual",
        "ranges 1 wave",
    ]
