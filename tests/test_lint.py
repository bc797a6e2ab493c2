"""The code base stays ruff- and mypy-clean: checked on every test run (and so in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{tool} is not installed in this environment (pip install -e '.[dev]')")
    return subprocess.run(
        [str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_clean() -> None:
    r = _run("ruff", "check", "engine", "native", "cli", "pkgroot", "lab", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_clean(tmp_path: Path) -> None:
    """mypy does not see setuptools' editable import hook, so check the package through
    symlinks laid out as it installs (the same as scripts/lint.sh)."""
    pkg = tmp_path / "snapferry"
    pkg.mkdir()
    for f in ("__init__.py", "__main__.py"):
        (pkg / f).symlink_to(ROOT / "pkgroot" / f)
    for d in ("engine", "native", "cli", "lab"):
        (pkg / d).symlink_to(ROOT / d, target_is_directory=True)
    exe = BIN / "mypy"
    if not exe.exists():
        pytest.skip("mypy is not installed in this environment (pip install -e '.[dev]')")
    r = subprocess.run(
        [str(exe), "-p", "snapferry"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MYPYPATH": str(tmp_path)},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout, r.stdout
