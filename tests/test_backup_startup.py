"""The start of a backup (issue 15, item 10): planning before any worker starts, no more
workers than work items, and a SIGTERM / Ctrl-C while the workers are still starting
(interpreter, imports) ends the backup in one line, with no traceback, no orphan and
a consistent repository. Moments: as soon as the first, the fourth, the eighth worker
process exists (the parent is still starting the others, or they are still importing).

The real CLI in its own process group; worker processes are found as the backup's
children in /proc (spawned interpreters), so the signal lands while they start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import imagegen
import pytest
from conftest import assert_one_line_error, cli_env, run_cli, snapferry_exe
from nbdservers import NbdServers, nbd_servers, requires

__all__ = ["nbd_servers"]  # the fixture, imported for use below

MiB = 1 << 20


def children(pid: int) -> set[int]:
    """The direct children of ``pid`` (empty once it has gone)."""
    out: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.update(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ignores_sigint(pid: int) -> bool:
    """The process has SIGINT ignored (the backup itself never may: a Ctrl-C would be
    lost; its workers start with it ignored)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except OSError:
        pass
    return False


def workers_of(pid: int) -> set[int]:
    """Children of the backup that are reader workers (spawned ``python -c ...
    spawn_main``), not qemu-nbd or the like."""
    found = set()
    for c in children(pid):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    found.add(c)
        except OSError:
            pass
    return found


@requires("nbdkit")
def test_planning_comes_before_the_workers_and_bounds_them(
    repo: Path, tmp_path: Path, nbd_servers: NbdServers
) -> None:
    """``--workers 100000`` on a 3 MiB export: while the (slowed) planning runs no
    worker exists, and then one starts, for the one work item."""
    image = imagegen.make_image(tmp_path / "d.raw", 3 * MiB, seed=5, zero_frac=0)
    srv = nbd_servers.nbdkit("file", str(image), "delay-extents=2", filters=["delay"])
    p = subprocess.Popen(
        [*snapferry_exe(), "backup", srv.uri, "--repo", str(repo), "--name", "many",
         "--workers", "100000", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )
    try:
        seen_during_planning: set[int] = set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5 and p.poll() is None:  # planning takes >= 2 s
            seen_during_planning |= workers_of(p.pid)
            time.sleep(0.02)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert seen_during_planning == set(), "workers were started before planning ended"
    res = json.loads(out)
    assert res["workers"] == 1 and res["disks"][0]["bytes_read"] == 3 * MiB


MOMENTS = {"first": 1, "half": 4, "all": 8}


@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_stop_signal_while_workers_start(
    repo: Path, tmp_path: Path, moment: str, how: str
) -> None:
    image = imagegen.make_image(tmp_path / "d.raw", 64 * MiB, seed=7)
    p = subprocess.Popen(
        [*snapferry_exe(), "backup", str(image), "--repo", str(repo), "--name", "d",
         "--workers", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
        start_new_session=True,  # its own process group, like a terminal job
    )
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(seen) < MOMENTS[moment]:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, f"only {len(seen)} workers appeared"
            seen |= workers_of(p.pid)
            assert not ignores_sigint(p.pid), "the backup ignores SIGINT while starting"
            time.sleep(0.002)
        # no wait here: the parent never ignores SIGINT, not even for a worker's
        # fork + exec (it used to, and a Ctrl-C in that millisecond was lost)
        if how == "sigterm":
            os.kill(p.pid, signal.SIGTERM)  # kill PID: the main process only
        else:
            os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the whole process group
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "Traceback" not in err and "Error" not in err, err
    line = assert_one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err),
                                 130)
    assert "interrupted" in line
    deadline = time.monotonic() + 10
    while any(alive(w) for w in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in seen if alive(w)], "worker processes left behind"
    v = run_cli("verify", "--repo", repo)
    assert v.returncode == 0, v.stdout + v.stderr
    info = run_cli("info", "--repo", repo, "--json")
    assert info.returncode == 0, info.stderr
    left = json.loads(info.stdout)["leftovers"]
    assert not any(left.values()), left  # the abort removed what it had stored
    lst = run_cli("list", "--repo", repo, "--json")
    assert json.loads(lst.stdout)["backups"] == []
