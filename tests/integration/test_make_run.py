"""`make run` installs what running needs and nothing else, quietly, without undoing `make test`.

The Makefile's run stamp is made for real into a fresh virtual environment under
``tmp_path`` (``VENV=...``), offline from uv's download cache, which `make test` filled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make(*args: str, venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", f"VENV={venv}", *args],
        cwd=ROOT,
        env={**os.environ, "UV_OFFLINE": "1", "UV_NO_PROGRESS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def leftover_wheel(directory: Path) -> Path:
    """A minimal wheel of one module, ``pubrelay_leftover`` (the wheel format's required
    files: the module, METADATA, WHEEL and RECORD)."""
    dist = "pubrelay_leftover-1.0.dist-info"
    files = {
        "pubrelay_leftover.py": b"",
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: pubrelay-leftover\nVersion: 1.0\n",
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    path = directory / "pubrelay_leftover-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{dist}/RECORD", record)
    return path


def installed(venv: Path, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([venv / "bin" / "python", "-c", probe], check=False).returncode == 0


def test_make_run_installs_the_runtime_only_without_deprecation_banners(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    created = make(f"{venv}/bin/python", venv=venv)
    assert created.returncode == 0, created.stderr
    uv = next((ROOT / ".tools").glob("uv-*/bin/uv"))
    # What a `make test` before it left in .venv: a package the run needs not (a wheel of
    # our own, so the install needs neither the network nor uv's index cache).
    leftover = leftover_wheel(tmp_path)
    subprocess.run(
        [uv, "pip", "install", "--offline", "--quiet", "--python", venv / "bin/python", leftover],
        check=True,
        timeout=60,
    )

    result = make(f"{venv}/.installed-run", venv=venv)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "--extra test" not in output
    assert "deprecat" not in output.lower()
    assert (venv / "bin" / "pubrelay").exists()
    assert installed(venv, "aiokafka")
    for test_only in ("pytest", "aiosmtpd", "mypy", "ruff", "pubrelay_example_plugin"):
        assert not installed(venv, test_only), f"make run installed {test_only}"
    assert installed(venv, "pubrelay_leftover"), "make run uninstalled what `make test` installed"
    assert not (venv / ".installed").exists()  # the test stamp is not claimed


def test_building_pubrelay_prints_no_setuptools_deprecation_banner(tmp_path: Path) -> None:
    # uv hides a build backend's output, pip and `uv build` show it: a `license` table
    # makes setuptools print a banner (removed support from 2027-02-18) on every build.
    # The project's metadata alone (a build in the working tree would leave build/ there).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    uv = next((ROOT / ".tools").glob("uv-*/bin/uv"))
    built = subprocess.run(
        [uv, "build", "--wheel", "--offline", "--out-dir", tmp_path / "dist", source],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert "deprecat" not in (built.stdout + built.stderr).lower()
    assert isinstance(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"], str
    )
