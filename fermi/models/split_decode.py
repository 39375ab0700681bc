"""Split-KV decode attention for CUDA: one Triton kernel that splits the keys and merges.

A one-token query gives an attention kernel little parallel work: at batch 1 the usual
kernels run about one thread block per KV head, so a 2,000-key cache is read by eight
multiprocessors. Here the keys of each (row, KV head) are cut into ``SPLITS`` ranges; one
program per range computes its share (the softmax's running maximum, its sum of
exponentials and the weighted sum of values) for the whole group of query heads that
share the KV head, reading each key and value once. The ranges are then merged with
their maxima rescaled by the last program of each (row, KV head) to finish, found with an
atomic counter, so one launch does the whole attention. How a call launches follows its
shape (:func:`launch_plan`): below :data:`ONE_RANGE_PAIRS` pairs (for 2-byte elements and
heads up to 128 wide; elsewhere below :data:`UNMEASURED_ONE_RANGE_PAIRS`) the keys are cut
into :data:`SPLITS` ranges; from there up each pair is one range and its program writes the
output directly, skipping the merge, which then costs more than splitting gains; while
those programs fit one wave on the GPU (2-byte elements, heads up to 128 wide) they run a
wider launch (:data:`ONE_WAVE_LAUNCH`: longer key blocks, more warps), each program with a
multiprocessor to itself. Both the range count and the choice between merging and writing
directly are fixed when the kernel is compiled (``SPLIT_COUNT``, ``ONE_RANGE``): a count
passed at run time cost Qwen3-8B 13 µs a layer at batch 1, and took the kernel from 144
registers a thread to 255 and a stack (``perf/regs_split_decode.py``; LOG.md run 66).

The mask is computed from the positions: key ``j`` of a row at position ``p`` is visible
when ``j <= p`` (and ``j > p - window`` for a sliding window), so no mask tensor is built.
Gemma-style soft-capping of the scores is applied before the mask.

Registered with ``torch.library.triton_op`` so that ``torch.compile(fullgraph=True)`` traces
it (with a symbolic cache length) and CUDA graphs capture it. Importing this module needs
Triton; ``available()`` says whether it could.
"""

# ruff: noqa: N803, SIM108 (Triton style: pointer and constexpr arguments in capitals)
from __future__ import annotations

import functools

import torch

SPLITS = 32  # key ranges per (row, KV head) where they split: 256 programs at batch 1, 8 KV heads
BLOCK_N = 64  # keys per inner iteration
# From this many pairs up, one range each, where the one-wave launch below serves them:
# splitting (partials, barrier, atomic, merge) cost more than it gained. Qwen3-8B's heads,
# 8 rows (64 pairs), µs a layer: 25.2 split into 4 ranges against 6.8 in one at 200 keys,
# 42.5 against 21.9 at 32 rows and 500 keys (LOG.md runs 59, 60). Below it (batch 1-7 with
# 8 KV heads) splitting still wins. Ranges past a row's keys are launched too: they read
# no key, store an empty partial (maximum -inf, sum 0) and count in at the merge. At batch 1
# and 200 keys 32 ranges (4 holding keys) took 15.7 µs a layer against 21.1 for only the 4,
# measured with the kernel of the time, which took the count at run time (LOG.md run 66).
ONE_RANGE_PAIRS = 64
# Where that rule was not measured (float32, heads wider than 128): one range each only
# from as many pairs as fill the GPU about four times over (512 programs on 132 SMs).
UNMEASURED_ONE_RANGE_PAIRS = 512
# (keys per block, warps, stages) for pairs that are one range each while there are no more
# of them than multiprocessors. 8 warps at Triton's 255 registers a thread fill a
# multiprocessor's 64K registers, so one program runs on each: faster alone (8 rows of 8B's
# heads at 2,100 keys: 28.7 against 55.6 µs a layer with the usual launch), slower in
# several waves (128 rows at 200 keys: 44.4 against 33.7). Measured on the H200 for 2-byte
# elements and heads up to 128 wide, where it is used. (Triton does not pipeline this
# loop's loads, so the stages change nothing; 3 is what was measured.)
ONE_WAVE_LAUNCH = (128, 8, 3)

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: the "split" decode kernel is not offered
    triton = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


if triton is not None:

    @triton.jit
    def _partials_kernel(
        Q, K, V, POS, ACC, M, L, COUNT, OUT,
        sqb, sqh, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        spb,
        length, split_len, window, scale, softcap,
        KV_HEADS: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        DP: tl.constexpr,
        BLOCK: tl.constexpr,
        SPLIT_COUNT: tl.constexpr,
        SPLIT_P2: tl.constexpr,
        CHUNK: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        IEEE: tl.constexpr,
        ONE_RANGE: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // KV_HEADS
        hk = pid % KV_HEADS
        rows = tl.arange(0, GP)
        dims = tl.arange(0, DP)
        row_ok = rows < G
        dim_ok = dims < D
        q_ptr = Q + b * sqb + (hk * G + rows)[:, None] * sqh + dims[None, :] * sqd
        q = tl.load(q_ptr, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        pos = tl.load(POS + b * spb)

        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        start = split * split_len
        stop = tl.minimum(start + split_len, length)
        stop = tl.minimum(stop, pos + 1)  # keys past the row's position are never visible
        for n0 in range(start, stop, BLOCK):
            keys = n0 + tl.arange(0, BLOCK)
            key_ok = keys < stop
            k_ptr = K + b * skb + hk * skh + keys[:, None] * skn + dims[None, :] * skd
            k = tl.load(k_ptr, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            if HAS_SOFTCAP:  # cap * tanh(s / cap), with tanh(x) = 1 - 2 / (exp(2x) + 1)
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            visible = key_ok
            if HAS_WINDOW:
                visible = visible & (keys > pos - window)
            # (compiled callers pass the scalars as float64: keep the loop state float32)
            s = tl.where(visible[None, :], s.to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptr = V + b * svb + hk * svh + keys[:, None] * svn + dims[None, :] * svd
            v = tl.load(v_ptr, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out_ok = row_ok[:, None] & dim_ok[None, :]
        if ONE_RANGE:
            # One range holds every key (wide batches): its output is final. The merge below
            # would compute the same value (its one weight is exp(0) = 1), after a chain of
            # dependent global round trips: partials, barrier, atomic, reloads. (Compiled
            # without the merge it was 1-6% faster where the count was a run-time argument,
            # LOG.md run 63; with the count compiled in, both builds take 138-144 registers
            # a thread on sm_90: perf/results/regs_split_decode.json.)
            o_ptr = OUT + (b * KV_HEADS + hk) * G * D + rows[:, None] * D + dims[None, :]
            tl.store(o_ptr, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=out_ok)
        else:
            # Partials [B * KV_HEADS * SPLIT_COUNT, G, D] and [.., G]; padded rows/dims dropped.
            base = (pid * SPLIT_COUNT + split) * G
            tl.store(ACC + (base + rows)[:, None] * D + dims[None, :], acc, mask=out_ok)
            tl.store(M + base + rows, m_i, mask=row_ok)
            tl.store(L + base + rows, l_i, mask=row_ok)

            # The last range of this (row, KV head) to finish merges all of them: the counter's
            # acquire/release orders every range's stores before the merge's loads, and the
            # merging program sets the counter back to zero for the next call. The release is
            # made by one thread and covers only the stores it has seen: the barrier makes it
            # see every thread's (Triton 3.5 happens to place one here for its scratch memory
            # anyway; this one does not depend on that, and compiles to the same PTX barrier).
            tl.debug_barrier()
            done = tl.atomic_add(COUNT + pid, 1, sem="acq_rel")
            if done == SPLIT_COUNT - 1:
                ranges = tl.arange(0, SPLIT_P2)  # SPLIT_P2: a power of two >= SPLIT_COUNT
                first = pid * SPLIT_COUNT * G
                for c0 in tl.static_range(0, G * D, CHUNK):  # CHUNK columns of the [G, D] output
                    cols = c0 + tl.arange(0, CHUNK)
                    col_ok = cols < G * D
                    group = cols // D
                    ok = col_ok[None, :] & (ranges[:, None] < SPLIT_COUNT)
                    at = first + ranges[:, None] * G + group[None, :]
                    m = tl.load(M + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    top = tl.max(m, 0)
                    top = tl.where(top == float("-inf"), 0.0, top)
                    w = tl.exp(m - top[None, :])  # a range with no visible key weighs 0
                    l_sum = tl.sum(tl.load(L + at, mask=ok, other=0.0, cache_modifier=".cg") * w, 0)
                    at = (first + ranges[:, None] * G) * D + cols[None, :]
                    a = tl.load(ACC + at, mask=ok, other=0.0, cache_modifier=".cg")
                    out = tl.sum(a * w, 0) / l_sum
                    o_ptr = OUT + (b * KV_HEADS + hk) * G * D + cols
                    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=col_ok)
                tl.atomic_xchg(COUNT + pid, 0)

    @triton_op("fermi::split_decode", mutates_args={})
    def split_decode(
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        counters: torch.Tensor,
        window: int,
        scale: float,
        softcap: float,
    ) -> torch.Tensor:
        # ``counters`` is read and written, but every call leaves it all zeros as it found
        # it: nothing observable changes, so it is declared an input only.
        b, h, _, d = q.shape
        kv_heads, length = keys.shape[1], keys.shape[2]
        pairs = b * kv_heads
        launches = launch_plan(pairs, length, d, q.element_size(), multiprocessors(q.device))
        # One flat axis of (pair, range) partials, sized for the split launch (SPLITS a pair)
        # and for one a pair where every pair is one range (unused then; a step's graph pool
        # holds them briefly): a separate range axis would be 1 at wide batches, and a
        # compile with dynamic shapes would guard on that and compile twice.
        rows = pairs * split_ranges(pairs, d, q.element_size())
        partials = (
            q.new_empty((rows, h // kv_heads, d), dtype=torch.float32),
            q.new_empty((rows, h // kv_heads), dtype=torch.float32),
            q.new_empty((rows, h // kv_heads), dtype=torch.float32),
        )
        out = q.new_empty((b, h, 1, d))
        kernel = wrap_triton(_partials_kernel)
        for programs, ranges, split_len, launch in launches:
            _launch(kernel, (programs, ranges), q, keys, values, positions, counters, out,
                    partials, split_len, window, scale, softcap, launch)  # fmt: skip
        return out


def _is_zero(n) -> bool:
    return isinstance(n, int) and n == 0


def _launch(kernel, grid, q, keys, values, positions, counters, out, partials, split_len,
            window, scale, softcap, launch) -> None:  # fmt: skip
    """Launch ``kernel`` (the jitted kernel, or it wrapped for a traced op) over ``grid``
    programs: (pairs, ranges), ``ranges`` a Python int, compiled into the kernel (one range:
    each program writes its output, with no merge code). ``launch`` is (keys per block,
    warps, stages); the rest are the op's inputs, its output and its partials (acc, m, l)."""
    h, d = q.shape[1], q.shape[3]
    kv_heads = keys.shape[1]
    g = h // kv_heads
    ranges = grid[1]
    block, warps, stages = launch
    acc, m, l_sum = partials
    kernel[grid](
        q, keys, values, positions, acc, m, l_sum, counters, out,
        q.stride(0), q.stride(1), q.stride(3),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        values.stride(0), values.stride(1), values.stride(2), values.stride(3),
        positions.stride(0),
        keys.shape[2], split_len, window, scale, softcap,
        KV_HEADS=kv_heads,
        G=g,
        GP=max(16, _pow2(g)),
        D=d,
        DP=max(16, _pow2(d)),
        BLOCK=block,
        SPLIT_COUNT=ranges,
        SPLIT_P2=_pow2(ranges),
        CHUNK=min(256, _pow2(g * d)),
        HAS_WINDOW=window > 0,
        HAS_SOFTCAP=softcap > 0.0,
        IEEE=q.dtype == torch.float32,
        ONE_RANGE=ranges == 1,
        num_warps=warps,
        num_stages=stages,
    )  # fmt: skip


def _measured(head_dim: int, element_size: int) -> bool:
    """Whether the one-range rule and the one-wave launch were measured for these heads."""
    return element_size == 2 and head_dim <= 128


def _one_range(pairs, head_dim: int, element_size: int):
    """1 where ``pairs`` pairs are one range each, else 0 (an expression if symbolic)."""
    start = ONE_RANGE_PAIRS if _measured(head_dim, element_size) else UNMEASURED_ONE_RANGE_PAIRS
    return torch.sym_min(1, pairs // start)


def split_ranges(pairs, head_dim: int, element_size: int):
    """Key ranges per (row, KV head) for ``pairs`` of them: :data:`SPLITS` below the one-range
    threshold (:data:`ONE_RANGE_PAIRS`, or :data:`UNMEASURED_ONE_RANGE_PAIRS` where that was
    not measured), one from there up. ``pairs`` may be symbolic (compiled with dynamic
    shapes): the count is then an expression, with no guard."""
    return SPLITS - (SPLITS - 1) * _one_range(pairs, head_dim, element_size)


def range_length(length, block: int = BLOCK_N):
    """Keys per range where ``length`` keys are cut into :data:`SPLITS` ranges: whole
    ``block``-key blocks, so the last ranges may hold none (their programs read no key and
    store an empty partial)."""
    return ((length + SPLITS - 1) // SPLITS + block - 1) // block * block


def launch_plan(pairs, length, head_dim: int, element_size: int, sms: int):
    """How the op launches for ``pairs`` (row, KV head) pairs over ``length`` keys on a GPU
    of ``sms`` multiprocessors: a list of ``(pairs it runs, ranges, keys per range, (keys per
    block, warps, stages))``, ranges a Python int in each.

    Below the one-range threshold (:func:`split_ranges`) the usual launch cuts the keys into
    :data:`SPLITS` ranges; from there up each pair is one range, run where it was measured
    (2-byte elements, heads up to 128 wide) by the one-wave launch up to ``sms`` pairs and by
    the usual one beyond. ``pairs`` and ``length`` may be symbolic: then every launch is
    listed, each over an expression of the pairs that is all of them or none (an empty grid
    launches nothing: Triton's and Inductor's launchers return at once, and a CUDA graph
    records no node), so the choice adds no guard and one compiled graph serves every batch.
    Concrete shapes list only launches with pairs to run."""
    block = BLOCK_N if head_dim <= 128 else BLOCK_N // 2  # Gemma's 256-wide heads: less smem
    usual = (block, 4, 2)
    ones = _one_range(pairs, head_dim, element_size)
    launches = [(pairs * (1 - ones), SPLITS, range_length(length, block), usual)]
    if _measured(head_dim, element_size):
        one_wave = 1 - torch.sym_min(1, pairs // (sms + 1))  # 1 up to ``sms`` pairs, else 0
        wide = pairs * ones * one_wave
        launches += [(wide, 1, length, ONE_WAVE_LAUNCH), (pairs * ones - wide, 1, length, usual)]
    else:
        launches.append((pairs * ones, 1, length, usual))
    return [x for x in launches if not _is_zero(x[0])]


def multiprocessors(device) -> int:
    """Multiprocessors of a CUDA ``device``; for Triton's interpreter on the CPU, an
    H200's 132, so that it runs the GPU's rule."""
    device = torch.device(device)
    if device.type != "cuda":
        return 132
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def counters_for(max_batch: int, kv_heads: int, device) -> torch.Tensor:
    """The zeroed counters :func:`split_decode_attention` needs: one per (row, KV head)."""
    return torch.zeros(max_batch * kv_heads, dtype=torch.int32, device=device)


def split_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    scale: float,
    softcap: float | None,
    counters: torch.Tensor,
) -> torch.Tensor:
    """q [B, H, 1, D] over keys/values [B, Hkv, L, D] at ``positions`` [B, 1] -> [B, H, 1, D].

    ``counters`` (:func:`counters_for`, at least B x Hkv zeros) tells the last range of each
    (row, KV head) to merge; one set serves every layer, as the calls run in order.
    """
    if triton is None:
        raise RuntimeError("the split decode kernel needs Triton (a CUDA build of torch)")
    t = q.shape[2]
    if t != 1:
        raise ValueError(f"split decode attention takes one query token per row, got {t}")
    if counters.numel() < q.shape[0] * keys.shape[1]:
        raise ValueError("split decode attention needs a counter per (row, KV head)")
    return split_decode(
        q, keys, values, positions, counters, window or 0, float(scale), float(softcap or 0.0)
    )
