"""Gemma 3, SmolLM3, Granite and Phi-4-mini on the CUDA-graph runner (skipped without CUDA).

Tiny random checkpoints in float32, compiled with Inductor and captured in CUDA graphs, with
the runner's CUDA defaults (the split-KV decode kernel, and the fused one-row products
where the architecture takes them), against the eager runner on CPU on the same weights;
Dynamo's counters across prompt lengths, batch shapes and contexts (nothing compiles after
warm-up); and the engine's greedy tokens on the GPU equal to the CPU's.
"""

from __future__ import annotations

import pytest
import torch

from fermi.loading import load_folder
from tests.arch_runners import CHUNK, MAX_BATCH, MAX_SEQ, eager_runner, max_runner_difference
from tests.test_arch_runners import SOURCES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = 2e-3  # float32 on both sides; the GPU's kernels sum in another order


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_archs")
    return {name: write(root / name) for name, (write, _) in SOURCES.items()}


def cuda_runner(folder):
    from fermi.runners.torch_cuda import CudaGraphRunner

    torch._dynamo.reset()
    model = load_folder(folder, torch.device("cuda"), torch.float32).model
    return CudaGraphRunner(model, MAX_BATCH, MAX_SEQ, prefill_chunk=CHUNK)


@pytest.mark.parametrize("name", list(SOURCES))
def test_compiled_graphs_equal_the_cpu_eager_runner_and_nothing_recompiles(folders, name):
    from torch._dynamo.utils import counters

    from fermi.models import gemv, split_decode

    runner = cuda_runner(folders[name])
    assert runner.decode_attention == ("split" if split_decode.available() else "sdpa")
    assert runner.row_kernels == (SOURCES[name][1] and gemv.available())
    before = dict(counters["stats"])
    assert max_runner_difference(runner, eager_runner(folders[name])) < TOL
    vocab = runner.capabilities.vocab_size
    for n in (1, 2, 15, 16):
        runner.prefill(n % MAX_BATCH, [(n * 7 + i) % vocab for i in range(n)], 0)
    runner.prefill(0, [3] * 16, 280)  # a context past 280: the largest length bucket
    for slots in ([0], [1], [0, 1], [2, 3], [0, 1, 2, 3]):
        for where in (3, 9, 255, 299):
            runner.decode(slots, [5] * len(slots), [where] * len(slots))
    assert dict(counters["stats"]) == before


@pytest.mark.parametrize("name", list(SOURCES))
def test_engine_greedy_on_gpu_equals_cpu_and_bf16_runs(folders, name):
    import fermi

    # 21 prompt tokens and 48 generated: past the 8-token windows and Phi-4-mini's switch
    # to its long rope factors at 32.
    prompt = [5, 77, 120, 33, 400, 9, 18] * 3
    kw = {"prompt_token_ids": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    torch._dynamo.reset()
    with fermi.load(folders[name], device="cuda", dtype="fp32", max_batch=2, max_seq_len=128) as e:
        assert e.capabilities.name == "torch-cuda"
        on_gpu = e.generate(**kw).token_ids
    with fermi.load(folders[name], device="cpu", max_batch=2, max_seq_len=128) as cpu:
        on_cpu = cpu.generate(**kw).token_ids
    assert on_gpu == on_cpu
    assert len(set(on_cpu)) > 1
    torch._dynamo.reset()
    with fermi.load(folders[name], device="cuda", dtype="bf16", max_batch=2, max_seq_len=128) as e:
        assert len(e.generate(**kw).token_ids) == 48
