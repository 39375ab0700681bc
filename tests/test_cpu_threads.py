"""The CPU runner's thread default (``fermi.runners.select.use_default_cpu_threads``): one
fewer than torch's, when fermi decides them. Each case is a fresh interpreter: OpenMP reads
its settings once, and the rule depends on what came first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
if sys.argv[2] == "torch first":
    import torch
import fermi
import torch
before = torch.get_num_threads()
with fermi.load(sys.argv[1], device="cpu", max_batch=1, max_seq_len=64) as engine:
    engine.generate(prompt="hi", max_tokens=2)
    after = torch.get_num_threads()
    phases = engine.runner.threads
import os
print(json.dumps([before, after, os.environ.get("OMP_WAIT_POLICY"), phases]))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("threads") / "tiny", {}, seed=2)


def run(folder: Path, order: str, **env: str) -> list:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    clean["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), order],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fermi_first_leaves_a_core_to_the_rest_of_the_process(folder):
    before, after, policy, phases = run(folder, "fermi first")
    assert policy == "PASSIVE"
    assert after == max(1, before - 1)
    assert phases == [before, max(1, before - 1)]  # prompts on every core, decode one fewer


def test_an_explicit_thread_count_or_torch_first_is_left_alone(folder):
    before, after, _, phases = run(folder, "fermi first", OMP_NUM_THREADS="2")
    assert before == after == 2 and phases is None
    before, after, policy, phases = run(folder, "torch first")
    assert before == after and policy is None and phases is None


def test_the_eager_runner_switches_threads_between_prompt_work_and_decode(folder):
    import torch

    from fermi.loading import load_folder
    from fermi.runners.torch_eager import TorchRunner

    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    runner = TorchRunner(model, 1, 64, prefill_chunk=32)
    kept = torch.get_num_threads()
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(*args, **kwargs)

    model.forward = spy
    try:
        runner.threads = (3, 1)
        runner.prefill(0, [5, 6, 7], 0)
        runner.decode([0], [8], [3])
        runner.prefill(0, [9], 4)
        assert seen == [3, 1, 3]
        runner.threads = None  # the caller's count is left as it is
        torch.set_num_threads(2)
        runner.decode([0], [8], [5])
        assert seen[-1] == 2
    finally:
        torch.set_num_threads(kept)
