"""Test helpers for the instant-recovery commands: run ``snapferry serve`` as a user does.

``serving(...)`` starts ``snapferry serve --json`` in the background, waits for its one
JSON line (the export answers then) and stops it with SIGTERM at the end, checking that
it exited 0. Sockets live in a short private directory (``short_dir``): unix socket
paths are limited to 108 bytes and pytest's tmp paths can be longer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli_env, snapferry_exe


def serve_missing() -> str | None:
    """Why ``snapferry serve`` cannot run here, or None."""
    if shutil.which("nbdkit") is None:
        return "nbdkit is not installed"
    r = subprocess.run(["nbdkit", "python", "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        return "nbdkit's python plugin (nbdkit-plugin-python) is not installed"
    for tool in ("nbdcopy", "nbdinfo", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


needs_serve = pytest.mark.skipif(serve_missing() is not None, reason=str(serve_missing()))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sfsv-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Served:
    def __init__(self, proc: subprocess.Popen[str], info: dict[str, Any]) -> None:
        self.proc = proc
        self.info = info
        self.uri: str = info["uri"]
        self.stderr = ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate(timeout=10)
            raise AssertionError("snapferry serve did not stop within the timeout") from None
        return self.proc.returncode


def start_serve(repo: Path, backup_id: str, *args: str) -> Served:
    proc = subprocess.Popen(
        [*snapferry_exe(), "serve", backup_id, "--repo", str(repo), "--json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"snapferry serve exited {proc.returncode}: {err}")
    return Served(proc, json.loads(line))


@contextmanager
def serving(repo: Path, backup_id: str, *args: str) -> Iterator[Served]:
    s = start_serve(repo, backup_id, *args)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            code = s.stop()
            assert code == 0, s.stderr


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
