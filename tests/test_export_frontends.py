"""Every front end works unchanged on an exported ONNX artefact (issue: common runners)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fermi
from export.build import ExportOptions, export_model
from fermi.rpc.generated import fermi_pb2 as pb
from fermi.rpc.generated import fermi_pb2_grpc as pb_grpc
from fermi.rpc.server import ServerThread
from tests.serving import REPO, running_server
from tests.tiny import write_checkpoint

MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontends")
    source = write_checkpoint(root / "ckpt", seed=5)
    options = ExportOptions(
        model=str(source), target="onnx", out=root / "onnx", max_seq_len=256, max_batch=2
    )
    export_model(options, progress=lambda _line: None)
    return source, root / "onnx"


@pytest.fixture(scope="module")
def expected(artefact):
    """Greedy replies of the torch engine on the source checkpoint."""
    source, _ = artefact
    with fermi.load(source, max_batch=1, max_seq_len=256) as engine:
        chat = engine.generate(messages=MESSAGES, max_tokens=10, temperature=0, thinking="off")
        raw = engine.generate(prompt="Once upon", max_tokens=10, temperature=0)
    return chat, raw


def test_python_api_on_the_artefact_uses_the_onnx_runner(artefact, expected):
    with fermi.load(artefact[1]) as engine:
        assert engine.capabilities.name == "onnx"
        out = engine.generate(messages=MESSAGES, max_tokens=10, temperature=0, thinking="off")
    assert out.token_ids == expected[0].token_ids


def test_http_server_serves_the_artefact_to_the_openai_client(artefact, expected, tmp_path):
    import openai

    with running_server(artefact[1], log=tmp_path / "serve.log") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        chat = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            extra_body={"thinking": "off"},
        )
    assert chat.choices[0].message.content == expected[0].text
    assert chat.usage.completion_tokens == len(expected[0].token_ids)


def test_grpc_server_streams_from_the_artefact(artefact, expected):
    request = pb.GenerateRequest(
        prompt="Once upon", sampling=pb.SamplingParams(max_tokens=10, temperature=0)
    )
    with (
        fermi.load(artefact[1]) as engine,
        ServerThread(engine) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        ids = [t for r in pb_grpc.FermiStub(channel).Generate(request) for t in r.token_ids]
    assert ids == expected[1].token_ids


def test_chat_cli_runs_on_the_artefact(artefact, expected):
    args = ["chat", "--model", str(artefact[1]), "--max-tokens", "10", "--temperature", "0"]
    res = subprocess.run(
        [sys.executable, "-m", "fermi.cli", *args, "--thinking", "off"],
        input=MESSAGES[0]["content"] + "\n",
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
    assert "onnx" in res.stdout.splitlines()[0]
    assert expected[0].text in res.stdout
