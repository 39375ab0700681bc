"""The CPU KV cache costs resident memory only where it is written."""

from __future__ import annotations

import sys

import pytest
import torch

from fermi import memory
from fermi.models.cache import KVCache

MIB = 1 << 20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_lazy_zeros_are_zero_writable_and_keep_their_shape():
    t = memory.lazy_zeros((3, 5, 7), torch.float32)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and not t.any()
    t[1, 2] = 4.0
    assert t.sum().item() == 28.0
    view = t[1]
    del t
    assert view.sum().item() == 28.0  # a view keeps the mapping alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_kv_cache_is_resident_only_where_written():
    before = rss()
    # 2 x 256 MiB of float32 cache: 8 slots x 8 heads x 8192 positions x 128.
    cache = KVCache(8, 8, 8192, 128, torch.float32, "cpu")
    assert rss() - before < 16 * MIB
    cache.k[0, :, :64] = 1.0  # one slot's first 64 positions: 8 heads x 32 KiB
    cache.v[0, :, :64] = 1.0
    assert rss() - before < 16 * MIB
    assert cache.k[0, 0, 63, 0].item() == 1.0 and cache.k[1].abs().sum().item() == 0.0


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_writes_its_own_copy_of_the_lazy_cache():
    import os

    t = memory.lazy_zeros((4, 1024), torch.float32)
    pid = os.fork()
    if pid == 0:  # the child writes, checks its copy and leaves at once (never into pytest)
        code = 1
        try:
            t.fill_(7.0)
            code = 0 if bool((t == 7.0).all()) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # 1: the write raised; 2: it did not hold
    assert not t.any()


def test_a_zero_size_lazy_cache_is_allowed_as_torch_zeros_allows_it():
    assert memory.lazy_zeros((0, 4), torch.float32).shape == (0, 4)


def test_fp16_storage_frees_each_float_weight_as_it_goes():
    """The load's peak must not hold a float and an fp16 copy of every weight: converting
    a layer's products happens while the layers converted before no longer hold their
    float weights (a list of every module kept them all alive before)."""
    import gc
    import weakref

    from torch import nn

    from fermi.models import half_weights
    from tests.test_causal_prefill import config, model_of

    model = model_of(config("qwen3"))
    refs = [weakref.ref(m) for m in model.modules() if isinstance(m, nn.Linear)]
    alive_at_each = []
    build = half_weights.HalfWeightLinear.__init__

    def counting(self, linear, *args, **kwargs):
        gc.collect()
        alive_at_each.append(sum(r() is not None for r in refs))
        build(self, linear, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(half_weights.HalfWeightLinear, "__init__", counting)
        half_weights.use_half_weights(model, "plain")
    # Two products a parent at most (attention: qkv, o; MLP: gate_up, down) are alive while
    # their parent converts; the rest went as their parents finished.
    assert len(alive_at_each) == len(refs)
    assert alive_at_each[-1] <= 2, alive_at_each
