"""A script that ends without ``Engine.close()`` exits 0: the engine thread is stopped at
interpreter exit instead of being killed inside torch's C++ (rc 134, "terminate called
without an active exception"). perf/check_clean_exit.py runs the same scripts 20 times."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.serving import REPO
from tests.tiny import write_checkpoint

# Ends right after a generation: the engine thread may still be freeing the step's tensors
# (before the fix: about 1 run in 10 aborted; perf/check_clean_exit.py repeats it).
AFTER_GENERATE = """
import sys
import fermi

engine = fermi.load(sys.argv[1], max_seq_len=128, max_batch=2)
print(engine.generate(prompt="hello", max_tokens=8, temperature=0).token_ids)
"""
# Ends while a generation runs on a daemon thread (before the fix: every run aborted).
DURING_GENERATE = """
import sys
import threading
import time

import fermi

engine = fermi.load(sys.argv[1], max_seq_len=128, max_batch=2)
engine.generate(prompt="hello", max_tokens=4, temperature=0)
threading.Thread(
    target=lambda: engine.generate(prompt="hi", max_tokens=100, temperature=0, ignore_eos=True),
    daemon=True,
).start()
time.sleep(0.05)
print("leaving")
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("exit") / "ckpt", seed=1)


def run_script(source: str, model) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", source, str(model)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize("script", [AFTER_GENERATE, DURING_GENERATE], ids=["after", "during"])
def test_a_script_without_close_exits_cleanly(checkpoint, script):
    for _ in range(2):
        res = run_script(script, checkpoint)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "terminate called" not in res.stderr
