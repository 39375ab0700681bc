"""The graph runner's paths on Gemma 3, SmolLM3, Granite and Phi-4-mini, run uncompiled on
CPU: its padded chunks and batches, the one-row products where the architecture takes them,
and the decode attention kernels written for CUDA (``math``, ``flex``), against the eager
runner on the same weights. tests/test_cuda_archs.py runs the same comparison compiled and
captured on a GPU."""

from __future__ import annotations

import pytest
import torch

from fermi.loading import load_folder
from fermi.runners.torch_cuda import CudaGraphRunner
from tests import test_arch_gemma3, test_arch_granite, test_arch_phi4_mini, test_arch_smollm3
from tests.arch_runners import CHUNK, MAX_BATCH, MAX_SEQ, eager_runner, max_runner_difference

TOL = 1e-4

# name -> (writer, whether the fused one-row products can express the architecture)
SOURCES = {
    "gemma3": (lambda p: test_arch_gemma3.write(p, "gemma3"), False),  # sandwich norms, GELU
    "smollm3": (lambda p: test_arch_smollm3.write(p, "sliding"), True),
    "granite": (lambda p: test_arch_granite.write(p, "untied_biases"), False),  # residual mult.
    "phi4_mini": (test_arch_phi4_mini.write, True),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_runners")
    return {name: write(root / name) for name, (write, _) in SOURCES.items()}


def graph_runner(folder, **kw) -> CudaGraphRunner:
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    return CudaGraphRunner(
        model, MAX_BATCH, MAX_SEQ, prefill_chunk=CHUNK, backend=None, use_graphs=False, **kw
    )


@pytest.mark.parametrize("name", list(SOURCES))
def test_graph_runner_with_row_products_equals_the_eager_runner(folders, name):
    folder = folders[name]
    runner = graph_runner(folder, row_kernels=True)
    assert runner.row_kernels == SOURCES[name][1]
    assert max_runner_difference(runner, eager_runner(folder)) < TOL


@pytest.mark.parametrize(
    ("name", "kind", "steps"),
    # flex runs unfused (slowly) without compilation: two steps, on the two architectures
    # whose scale or windows it must carry.
    [*((name, "math", 8) for name in SOURCES), ("gemma3", "flex", 2), ("granite", "flex", 2)],
)
def test_decode_attention_kernels_equal_sdpa(folders, name, kind, steps):
    # Windows, the attention scale (query_pre_attn_scalar, attention_multiplier) and the
    # positions reach the kernels that CUDA decode uses.
    runner = graph_runner(folders[name], row_kernels=False)
    for layer in runner.model.model.layers:
        layer.self_attn.decode_kernel = kind
    assert max_runner_difference(runner, eager_runner(folders[name]), steps=steps) < TOL
