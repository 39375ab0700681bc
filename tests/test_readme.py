"""The README's quick start is what CI runs, and what it promises exists."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from fermi.cli import main

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README has no Quick start block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_verbatim():
    commands = quick_start_commands()
    assert len(commands) == 2
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert commands[1] in ci


def test_quick_start_targets_exist_in_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    for command in quick_start_commands():
        target = command.removeprefix("make ").strip()
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_every_cli_command_named_in_the_readme_exists():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\bfermi (chat|generate|serve|grpc|export)\b", readme))
    runner = CliRunner()
    for command in sorted(named):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
