"""The Apple silicon path, tested on Linux by forcing what the selection logic reads (no
MPS device runs here): `fermi.load` picks torch's ``mps`` device on an M-series Mac when
no device is asked, in fp16; bf16 there needs macOS 14; the memory check reads Metal's
figures; ops MPS lacks fall back to the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fermi import memory
from fermi.errors import ModelLoadError
from fermi.loading import parse_dtype
from fermi.runners import select

MPS = torch.device("mps")


@pytest.fixture
def mac(monkeypatch):
    """A machine that answers like an Apple-silicon Mac without CUDA."""
    monkeypatch.setattr(select.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(select.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    return monkeypatch


def test_an_apple_silicon_mac_loads_on_mps_in_fp16(mac):
    assert select.default_device() == MPS
    assert parse_dtype(None, MPS) == parse_dtype("auto", MPS) == torch.float16
    assert parse_dtype("fp32", MPS) == torch.float32


def test_cuda_wins_and_intel_macs_and_linux_stay_on_cpu(mac):
    mac.setattr(select.platform, "machine", lambda: "x86_64")
    assert select.default_device() == torch.device("cpu")
    mac.setattr(select.platform, "machine", lambda: "arm64")
    mac.setattr(select.platform, "system", lambda: "Linux")
    assert select.default_device() == torch.device("cpu")
    mac.setattr(select.platform, "system", lambda: "Darwin")
    mac.setattr(torch.backends.mps, "is_available", lambda: False)  # torch built without MPS
    assert select.default_device() == torch.device("cpu")
    mac.setattr(torch.cuda, "is_available", lambda: True)
    assert select.default_device() == torch.device("cuda")


@pytest.mark.parametrize(("macos_14", "ok"), [(True, True), (False, False)])
def test_bf16_on_mps_needs_macos_14(monkeypatch, macos_14, ok):
    asked = []

    def is_macos_or_newer(major, minor):
        asked.append((major, minor))
        return macos_14

    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", is_macos_or_newer)
    if ok:
        assert parse_dtype("bf16", MPS) == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="macOS 14 or later: use fp16"):
            parse_dtype("bf16", MPS)
    assert asked == [(14, 0)]
    assert parse_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # not asked off MPS
    assert asked == [(14, 0)]


def test_the_memory_check_on_mps_reads_metals_figures(monkeypatch):
    gib = memory.GIB
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * gib)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 4 * gib)
    assert memory.free_memory(MPS) == 12 * gib
    memory.require_free(12 * gib, MPS, "the weights", "use fp16")
    with pytest.raises(ModelLoadError, match=r"needs 13\.0 GiB and mps has 12\.0 GiB free"):
        memory.require_free(13 * gib, MPS, "the weights", "use fp16")


def _import_fermi_as(platform: str, env: dict[str, str]) -> str:
    code = (
        f"import sys; sys.platform = {platform!r}; import fermi, os; "
        "print(os.environ.get('PYTORCH_ENABLE_MPS_FALLBACK'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return out.stdout.strip()


def test_ops_mps_lacks_fall_back_to_the_cpu_unless_the_user_said_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    assert _import_fermi_as("darwin", env) == "1"
    assert _import_fermi_as("darwin", {**env, "PYTORCH_ENABLE_MPS_FALLBACK": "0"}) == "0"
    assert _import_fermi_as("linux", env) == "None"
