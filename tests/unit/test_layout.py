"""The structure keeps its promises: imports point one way, built-ins use the runtime only
as plugins do, light commands stay light, and docs/architecture.md maps every module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "bus", "consumer", "handlers", "pubrelay")
ARCHITECTURE = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"

# `pubrelay → consumer | handlers → bus → schemas`: what each package may import of ours
# (the console is `pubrelay/console/`: it reads both sides).
ALLOWED: dict[str, set[str]] = {
    "schemas": {"schemas"},
    "bus": {"bus", "schemas"},
    "consumer": {"consumer", "bus", "schemas"},
    "handlers": {"handlers", "bus", "schemas"},
    "pubrelay": set(PACKAGES),
}
# What a built-in handler may import of the handlers package: the plugin contract, and
# the built-ins' own modules. Never the worker runtime.
BUILTIN_MAY_IMPORT = ("handlers.types", "handlers.builtin")


def production_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def ours(module: str) -> str | None:
    top = module.split(".", 1)[0]
    return top if top in PACKAGES else None


@pytest.mark.parametrize("path", production_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path: Path) -> None:
    package = path.relative_to(ROOT).parts[0]
    wrong = sorted(
        m for m in imported_modules(path) if (top := ours(m)) and top not in ALLOWED[package]
    )
    assert not wrong, f"{package} must not import {wrong}"


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "handlers" / "builtin").rglob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_built_in_handlers_use_the_runtime_only_through_the_plugin_contract(path: Path) -> None:
    wrong = sorted(
        m
        for m in imported_modules(path)
        if m.startswith("handlers") and not m.startswith(BUILTIN_MAY_IMPORT)
    )
    assert not wrong, f"a built-in handler imports {wrong}; plugins see only handlers.types"


def test_the_dead_letter_commands_do_not_load_the_consume_loop_or_the_web_app() -> None:
    heavy = ("handlers.worker.runner", "handlers.worker.attempts", "consumer.webhook")
    probe = (
        "import sys, pubrelay.cli, handlers.worker.replay; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_the_architecture_doc_names_every_module_and_only_modules_that_exist() -> None:
    text = ARCHITECTURE.read_text()
    named = set(re.findall(r"`([a-z0-9_]+\.py)`", text))
    files = {p.name for p in production_modules()}
    missing = sorted(
        str(p.relative_to(ROOT))
        for p in production_modules()
        if p.name != "__init__.py" and p.name not in named
    )
    assert not missing, f"docs/architecture.md does not mention {missing}"
    assert named <= files | {"pyproject.toml"}, sorted(named - files)
    folders = {p.parent.relative_to(ROOT).as_posix() for p in production_modules()}
    for folder in folders:
        assert f"{folder.split('/')[-1]}/" in text, f"docs/architecture.md lacks {folder}/"


def test_the_readme_links_the_architecture_and_lists_every_package() -> None:
    text = README.read_text()
    assert "(docs/architecture.md)" in text
    for package in (*PACKAGES, "deploy", "docs"):
        assert f"| `{package}/` |" in text, package
