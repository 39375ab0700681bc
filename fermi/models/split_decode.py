"""Split-KV decode attention for CUDA: one Triton kernel that splits the keys and merges.

A one-token query gives an attention kernel little parallel work: at batch 1 the usual
kernels run about one thread block per KV head, so a 2,000-key cache is read by eight
multiprocessors. Here the keys of each (row, KV head) are cut into ``SPLITS`` ranges; one
program per range computes its share (the softmax's running maximum, its sum of
exponentials and the weighted sum of values) for the whole group of query heads that
share the KV head, reading each key and value once. The ranges are then merged with
their maxima rescaled by the last program of each (row, KV head) to finish, found with an
atomic counter, so one launch does the whole attention. How many ranges a call cuts follows
its shape (:func:`split_count`, :func:`key_ranges`): enough programs to fill the GPU, and
only ranges that hold keys. Where that is one range (wide batches), each program writes its
output directly and the merge is skipped.

The mask is computed from the positions: key ``j`` of a row at position ``p`` is visible
when ``j <= p`` (and ``j > p - window`` for a sliding window), so no mask tensor is built.
Gemma-style soft-capping of the scores is applied before the mask.

Registered with ``torch.library.triton_op`` so that ``torch.compile(fullgraph=True)`` traces
it (with a symbolic cache length) and CUDA graphs capture it. Importing this module needs
Triton; ``available()`` says whether it could.
"""

# ruff: noqa: N803, SIM108 (Triton style: pointer and constexpr arguments in capitals)
from __future__ import annotations

import torch

SPLITS = 32  # most key ranges per (row, KV head): 256 programs at batch 1 with 8 KV heads
BLOCK_N = 64  # keys per inner iteration
# Programs a call aims for (about four per multiprocessor on a 132-SM Hopper). Wide batches
# already give that many (row, KV head) pairs, so they split less: at 128 rows and 8 KV
# heads one range each, where 32 left 28 of every 32 programs without a key to read.
TARGET_PROGRAMS = 512

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
        length, split_len, splits, window, scale, softcap,
        KV_HEADS: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        DP: tl.constexpr,
        BLOCK: tl.constexpr,
        SPLIT_COUNT: tl.constexpr,
        CHUNK: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        IEEE: tl.constexpr,
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
        if splits == 1:
            # One range holds every key (wide batches): its output is final. The merge below
            # would compute the same value (its one weight is exp(0) = 1), after a chain of
            # dependent global round trips: partials, barrier, atomic, reloads.
            o_ptr = OUT + (b * KV_HEADS + hk) * G * D + rows[:, None] * D + dims[None, :]
            tl.store(o_ptr, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=out_ok)
        else:
            # Partials [B * KV_HEADS * splits, G, D] and [.., G]; padded rows/dims dropped.
            base = (pid * splits + split) * G
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
            if done == splits - 1:
                ranges = tl.arange(0, SPLIT_COUNT)  # SPLIT_COUNT: a power of two >= splits
                first = pid * splits * G
                for c0 in tl.static_range(0, G * D, CHUNK):  # CHUNK columns of the [G, D] output
                    cols = c0 + tl.arange(0, CHUNK)
                    col_ok = cols < G * D
                    group = cols // D
                    ok = col_ok[None, :] & (ranges[:, None] < splits)
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
        g = h // kv_heads
        dp = max(16, _pow2(d))
        block = BLOCK_N if dp <= 128 else BLOCK_N // 2  # Gemma's 256-wide heads: less smem
        splits, split_len = key_ranges(b * kv_heads, length, block)
        # One flat axis of (pair, range) partials: a separate range axis would be 1 at wide
        # batches, and a compile with dynamic shapes would guard on that and compile twice.
        acc = q.new_empty((b * kv_heads * splits, g, d), dtype=torch.float32)
        m = q.new_empty((b * kv_heads * splits, g), dtype=torch.float32)
        l_sum = q.new_empty((b * kv_heads * splits, g), dtype=torch.float32)
        out = q.new_empty((b, h, 1, d))
        wrap_triton(_partials_kernel)[(b * kv_heads, splits)](
            q, keys, values, positions, acc, m, l_sum, counters, out,
            q.stride(0), q.stride(1), q.stride(3),
            keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
            values.stride(0), values.stride(1), values.stride(2), values.stride(3),
            positions.stride(0),
            length, split_len, splits, window, scale, softcap,
            KV_HEADS=kv_heads,
            G=g,
            GP=max(16, _pow2(g)),
            D=d,
            DP=dp,
            BLOCK=block,
            SPLIT_COUNT=SPLITS,
            CHUNK=min(256, _pow2(g * d)),
            HAS_WINDOW=window > 0,
            HAS_SOFTCAP=softcap > 0.0,
            IEEE=q.dtype == torch.float32,
            num_stages=2,
        )  # fmt: skip
        return out


def split_count(pairs, length, block: int = BLOCK_N):
    """Key ranges per (row, KV head) for ``pairs`` of them over ``length`` keys: enough for
    about :data:`TARGET_PROGRAMS` programs, at most :data:`SPLITS`, at least one, and no more
    than the ``block``-key blocks there are. ``pairs`` and ``length`` may be symbolic
    (compiled with dynamic shapes): the choice then stays an expression, with no guard."""
    wanted = (TARGET_PROGRAMS + pairs - 1) // pairs
    blocks = (length + block - 1) // block
    return torch.sym_max(1, torch.sym_min(SPLITS, torch.sym_min(wanted, blocks)))


def key_ranges(pairs, length, block: int = BLOCK_N):
    """``(ranges, keys per range)`` as the kernel cuts ``length`` keys for ``pairs`` (row,
    KV head) pairs: :func:`split_count` ranges, each rounded up to whole ``block``-key
    blocks, then only as many as hold a key (rounding can leave the last ones empty: 300
    keys in 4 ranges of 128 fill 3). Symbolic inputs give expressions, with no guard."""
    count = split_count(pairs, length, block)
    per_range = (length + count - 1) // count
    span = (per_range + block - 1) // block * block
    return (length + span - 1) // span, span


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
