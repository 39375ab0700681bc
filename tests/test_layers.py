"""The package's import arrows point down: front ends -> engine -> runners -> models/text,
with sampling below engine and runners; front ends use the engine through ``Engine`` alone.

Read from the source (every import statement, also those inside functions), so a lazy
import cannot hide an arrow pointing up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fermi"
FRONT_ENDS = ("fermi.server", "fermi.rpc", "fermi.cli")
ENGINE = "fermi.engine"
# The engine's inside: front ends go through fermi.engine.api (Engine) and its data types.
ENGINE_INSIDE = ("fermi.engine.scheduler", "fermi.engine.core", "fermi.engine.slots")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {
        module_name(p): ast.parse(p.read_text(), str(p))
        for p in sorted(PACKAGE.rglob("*.py"))
        if "generated" not in p.parts
    }


def imported(name: str, tree: ast.Module) -> set[str]:
    """Every module ``tree`` imports (absolute names; ``from x import y`` counts x.y too)."""
    found = set()
    package = name.rsplit(".", 1)[0] if not name.endswith("__init__") else name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


TREES = modules()


def violations(lower: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name, tree in TREES.items()
        if under(name, *lower)
        for target in imported(name, tree)
        if under(target, *forbidden)
    )


def test_the_package_is_read_whole():
    assert {"fermi.engine.scheduler", "fermi.runners.base", "fermi.models.decoder"} <= set(TREES)
    # The check sees imports made inside functions too.
    assert "fermi.runners.torch_cuda" in imported(
        "fermi.runners.select", TREES["fermi.runners.select"]
    )


@pytest.mark.parametrize(
    ("lower", "forbidden"),
    [
        (("fermi.runners", "fermi.models", "fermi.text", "fermi.sampling"), (ENGINE, *FRONT_ENDS)),
        ((ENGINE,), FRONT_ENDS),
        (("fermi.sampling",), ("fermi.runners", "fermi.models")),
    ],
    ids=["runners-models-text-sampling", "engine", "sampling"],
)
def test_no_import_points_up(lower, forbidden):
    assert violations(lower, forbidden) == []


def test_front_ends_use_the_engine_through_its_facade():
    assert violations(FRONT_ENDS, ENGINE_INSIDE) == []
    reached = sorted(
        f"{name}:{node.lineno} .{node.attr}"
        for name, tree in TREES.items()
        if under(name, *FRONT_ENDS)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("scheduler", "_core")
    )
    assert reached == []
