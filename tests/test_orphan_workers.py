"""Reader workers whose parent ``snapferry backup`` was SIGKILLed mid-copy leave quietly
(issue 15, item 10: they printed 60-line ``BrokenPipeError`` tracebacks)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import imagegen
from conftest import snapferry_exe


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_orphaned_workers_exit_without_a_traceback(repo: Path, tmp_path: Path) -> None:
    image = imagegen.make_image(tmp_path / "big.raw", 256 << 20, seed=7)
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        p = subprocess.Popen([*snapferry_exe(), "backup", str(image), "--repo", str(repo),
                              "--workers", "2"], stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True)
    workers: list[int] = []
    packs = repo / "data"
    end = time.monotonic() + 120
    # mid-copy: workers running and a first pack (or its temp file) already written
    while time.monotonic() < end and p.poll() is None:
        workers = [c for c in _children(p.pid) if "resource_tracker" not in
                   Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]
        if len(workers) >= 2 and packs.exists() and any(
                f.is_file() for f in packs.rglob("*")):
            break
        time.sleep(0.05)
    assert p.poll() is None, "the backup finished before it could be killed mid-copy"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    end = time.monotonic() + 60
    while any(_alive(w) for w in workers) and time.monotonic() < end:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "orphaned workers kept running"
    text = err_path.read_text()
    assert "Traceback" not in text and "BrokenPipeError" not in text, text
