"""A pool of two engine replicas behind one server (on CPU they share the device):
requests spread over both, and every output equals the single-engine run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import openai
import pytest
from click.testing import CliRunner

import fermi
from fermi.cli import main
from tests.serving import REPO, free_port, http, metric, running_server, thinking_checkpoint

SEQ_LEN = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return thinking_checkpoint(tmp_path_factory.mktemp("pool") / "tiny", max_positions=SEQ_LEN)


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("pool-log") / "serve.log"
    args = ["--pool", "2", "--device", "cpu", "--max-seq-len", str(SEQ_LEN), "--max-batch", "8"]
    with running_server(model_dir, *args, log=log) as url:
        yield url


def test_32_concurrent_streams_spread_over_replicas_and_equal_solo_runs(base, model_dir):
    async def stream(client, seed: int) -> str:
        messages = [{"role": "user", "content": f"Question number {seed}?"}]
        parts = []
        response = await client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=8,
            seed=seed,
            stream=True,
            extra_body={"thinking": "off"},
        )
        async for chunk in response:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
        return "".join(parts)

    async def run_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        try:
            return await asyncio.gather(*(stream(client, seed) for seed in range(32)))
        finally:
            await client.close()

    got = asyncio.run(run_all())
    with fermi.load(model_dir, max_seq_len=SEQ_LEN, max_batch=8) as engine:
        solo = [
            engine.generate(
                messages=[{"role": "user", "content": f"Question number {seed}?"}],
                max_tokens=8,
                seed=seed,
                thinking="off",
            ).text
            for seed in range(32)
        ]
    assert got == solo
    assert len(set(got)) > 16  # independent outputs, not one answer copied around
    text = http(base + "/metrics")[2].decode()
    routed = [metric(text, "fermi:replica_requests_total", replica=r) for r in ("0", "1")]
    assert sum(routed) == 32 and min(routed) >= 8


def test_health_and_metrics_report_each_replica(base):
    status, _, raw = http(base + "/health")
    assert status == 200
    assert json.loads(raw)["replicas"] == ["replica 0 (cpu): ok", "replica 1 (cpu): ok"]
    text = http(base + "/metrics")[2].decode()
    for replica in ("0", "1"):
        assert metric(text, "fermi:replica_load", replica=replica, device="cpu") == 0
        assert metric(text, "fermi:num_requests_running", replica=replica) == 0


# The start-up checks below come after the port's: the default port may be taken on a
# machine running a server (found when a server ran beside the suite).
FREE_PORT = ("--port", str(free_port()))


def test_more_replicas_than_gpus_is_a_start_up_error(model_dir):
    result = CliRunner().invoke(
        main,
        ["serve", "--model", str(model_dir), "--pool", "64", "--device", "cuda", *FREE_PORT],
    )
    assert result.exit_code == 2
    assert "--pool 64 needs 64 GPUs" in result.output


def test_pool_and_devices_that_disagree_are_a_start_up_error(model_dir):
    result = CliRunner().invoke(
        main,
        ["serve", "--model", str(model_dir), "--pool", "3", "--devices", "cpu,cpu", *FREE_PORT],
    )
    assert result.exit_code == 2
    assert "--pool 3 does not match --devices" in result.output


def test_a_pool_of_zero_from_the_environment_is_named_as_the_variable(model_dir):
    """The message named --pool, which the user never passed."""
    result = CliRunner().invoke(
        main, ["serve", "--model", str(model_dir), *FREE_PORT], env={"FERMI_ENGINE_POOL": "0"}
    )
    assert result.exit_code == 2
    assert "(env var: 'FERMI_ENGINE_POOL'): 0 is not in the range x>=1" in result.output


def test_missing_model_is_a_start_up_error(tmp_path):
    result = CliRunner().invoke(
        main, ["serve", "--model", str(tmp_path / "nothing-here"), *FREE_PORT]
    )
    assert result.exit_code == 1 and "no such file or folder" in result.output


def test_model_that_fails_to_load_stops_the_server_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cmd = [sys.executable, "-m", "fermi.cli", "serve", "--model", str(tmp_path)]
    cmd += ["--port", str(free_port())]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot start the server:" in done.stderr and "not supported" in done.stderr
    assert "Traceback" not in done.stderr
