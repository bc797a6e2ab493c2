"""Shared fixtures: the snapferry CLI as a user runs it, repositories, mixed images.

``imagegen`` (tests/imagegen.py) is imported here first so that it owns the module name
``imagegen`` for the whole session (bench/imagegen.py's names are reachable through it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import imagegen

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TEST_IMAGE_SIZE = 64 << 20


def snapferry_exe() -> list[str]:
    """The installed console script (as a user runs it), else ``python -m snapferry``."""
    exe = VENV_BIN / "snapferry"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("snapferry")
    return [found] if found else [sys.executable, "-m", "snapferry"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFERRY_")}
    env.update(extra)
    return env


def run_cli(
    *args: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``snapferry ARGS`` in a subprocess (stdout/stderr captured, not a tty)."""
    return subprocess.run(
        [*snapferry_exe(), *map(str, args)],
        capture_output=True,
        text=True,
        env=env if env is not None else cli_env(),
        timeout=timeout,
        cwd=ROOT,
    )


def assert_one_line_error(p: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """A failed command: non-zero exit, exactly one ``snapferry: ...`` line, no traceback."""
    assert p.returncode != 0, p
    if code is not None:
        assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("snapferry: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


@contextmanager
def small_tmpfs(where: Path, size: str, why_root: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for disk-full tests (needs root: skips
    with ``why_root`` otherwise); unmounted on exit."""
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(why_root)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def manifests(repo: Path) -> list[Path]:
    return sorted((repo / "snapshots").glob("*"))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh repository (1 MiB chunks) made with ``snapferry init``."""
    path = tmp_path / "repo"
    p = run_cli("init", path, "--chunk-size", "1M")
    assert p.returncode == 0, p.stderr
    return path


@pytest.fixture
def mixed_image(tmp_path: Path) -> Path:
    """A 64 MiB mixed image (zeros incl. real holes, text, random, repeated blocks)."""
    return imagegen.make_image(tmp_path / "disk.raw", TEST_IMAGE_SIZE, seed=1234)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Background processes started by a test; killed at teardown whatever happened."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
