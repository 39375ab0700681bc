"""The Dockerfile, checked without a Docker engine: parsed, its files exist, its command runs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed)
    return parsed


def test_base_image_is_a_cuda_pytorch_image():
    args = dict(a.split("=", 1) for a in args_of("ARG") if "=" in a)
    (base,) = args_of("FROM")
    image = args.get(base.strip("${}"), base)
    assert image.startswith("pytorch/pytorch:") and "cuda" in image


def test_every_copied_source_exists_in_the_repository():
    copies = args_of("COPY")
    assert copies
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_package_installs_from_the_copied_tree_with_its_serving_dependencies():
    runs = " ".join(args_of("RUN"))
    assert "pip install --no-cache-dir ." in runs
    deps = pyproject()["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0] for d in deps}
    assert {"granian", "msgspec", "grpcio"} <= names  # serve and grpc need no extra


def test_runs_as_a_non_root_user_with_the_hf_cache_on_a_volume():
    (user,) = args_of("USER")
    assert user not in ("root", "0")
    env = " ".join(args_of("ENV"))
    assert "HF_HOME=/home/fermi/.cache/huggingface" in env
    (volume,) = args_of("VOLUME")
    assert exec_form(volume) == ["/home/fermi/.cache"]


def test_exposes_http_and_grpc_and_checks_health():
    ports = {int(p) for rest in args_of("EXPOSE") for p in rest.split()}
    assert ports == {8000, 50051}
    (health,) = args_of("HEALTHCHECK")
    assert "CMD" in health and "http://127.0.0.1:8000/health" in health


def test_default_command_is_a_real_fermi_cli_entry():
    scripts = pyproject()["project"]["scripts"]
    assert scripts["fermi"] == "fermi.cli:main"
    (entry,) = args_of("ENTRYPOINT")
    (cmd,) = args_of("CMD")
    argv = exec_form(entry) + exec_form(cmd)
    assert argv[:2] == ["fermi", "serve"]
    pytest.importorskip("granian")
    from fermi.cli import main

    group_ctx = click.Context(main)
    command = main.get_command(group_ctx, argv[1])
    assert command is not None, f"`fermi {argv[1]}` is not a CLI command"
    # Parsing checks every option and value the image passes, without starting a server.
    ctx = command.make_context(argv[1], argv[2:], parent=group_ctx)
    assert ctx.params["host"] == "0.0.0.0" and ctx.params["port"] == 8000
