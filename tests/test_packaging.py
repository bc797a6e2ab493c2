"""Packaging as a user meets it: ``pip install .`` (not editable) into a fresh venv.

- the distribution installs one top-level package, ``snapferry`` (and its dist-info and
  console script), nothing named ``engine``, ``cli`` or ``native``;
- ``snapferry --help`` and ``python -m snapferry --help`` work from another directory;
- part of the test suite runs under a second Python version (3.12 / 3.13) when the
  machine has one, against that non-editable install.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Fast, tool-light test files that exercise the store, the pipeline and restore.
SECOND_PYTHON_TESTS = ["tests/test_restore.py", "tests/test_backup_roundtrip.py"]


def _other_python() -> str | None:
    """A CPython 3.12+ other than the one running the tests, if the machine has one."""
    me = sys.version_info[:2]
    cands = [shutil.which(f"python3.{m}") for m in (13, 12)]
    for pattern in ("/root/.pyenv/versions/3.1[23].*/bin/python3", "/usr/bin/python3.1[23]"):
        cands += sorted(glob.glob(pattern), reverse=True)
    for c in cands:
        if not c:
            continue
        r = subprocess.run(
            [c, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True,
        )
        if r.returncode == 0 and tuple(map(int, r.stdout.split("."))) != me:
            return c
    return None


def _venv(python: str, where: Path, *extra: str) -> Path:
    subprocess.run([python, "-m", "venv", str(where)], check=True, capture_output=True)
    pip = [str(where / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    r = subprocess.run([*pip, str(ROOT), *extra], capture_output=True, text=True,
                       cwd=where, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return where


def _site_packages(venv: Path) -> Path:
    (sp,) = venv.glob("lib/python3.*/site-packages")
    return sp


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(sys.executable, tmp_path_factory.mktemp("wheel") / "venv")


def test_installs_only_the_snapferry_package(installed: Path) -> None:
    sp = _site_packages(installed)
    (dist,) = sp.glob("snapferry-*.dist-info")
    tops = set()
    for line in (dist / "RECORD").read_text().splitlines():
        path = line.split(",", 1)[0]
        if not path.startswith(".."):
            tops.add(path.split("/", 1)[0])
    assert tops == {"snapferry", dist.name}, tops
    for stray in ("engine", "cli", "native", "pkgroot"):
        assert not (sp / stray).exists(), f"{stray} installed at the top level"
    assert (sp / "snapferry" / "engine" / "store").is_dir()


def test_console_script_and_module_run_from_elsewhere(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for cmd in ([str(installed / "bin" / "snapferry"), "--help"],
                [str(installed / "bin" / "python"), "-m", "snapferry", "--help"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert "usage: snapferry" in r.stdout
    r = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import snapferry.engine.store, snapferry; print(snapferry.engine.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert r.returncode == 0, r.stderr
    assert str(_site_packages(installed)) in r.stdout, "imported from the checkout, not the venv"


def test_suite_runs_under_a_second_python(tmp_path: Path) -> None:
    python = _other_python()
    if python is None:
        pytest.skip("no second CPython 3.12+ on this machine")
    venv = _venv(python, tmp_path / "venv", "pytest", "pytest-timeout", "pytest-benchmark")
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *SECOND_PYTHON_TESTS],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"},
    )
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
