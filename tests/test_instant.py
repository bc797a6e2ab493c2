"""Instant recovery with the real lab VM: serve its restore point, pull files out of it,
boot a VM from it and restore that VM live while the guest writes.

VM boots here: the shared lab VM (``lab_vm``) plus two instant boots of one lab dir
(the first interrupted mid-copy, the second resuming from its overlays and finishing),
and one more instant boot whose ``instant`` process is SIGKILLed three times (during
the boot, mid-copy, right after the switch) and taken over by the next run each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli_env, run_cli, snapferry_exe
from coordvm import guest_ticker, max_gap_ms
from labvm import lab_vm
from servecli import needs_serve, serving

from snapferry.engine import faults
from snapferry.engine.procs import process_alive
from snapferry.engine.qemu.agent import GuestAgent
from snapferry.engine.qemu.qmp import Qmp
from snapferry.engine.store import Repository
from snapferry.engine.store.locks import live_locks
from snapferry.lab import check as labcheck
from snapferry.lab.vm import LabVm, lab_down

__all__ = ["lab_vm"]
pytestmark = [pytest.mark.vm, needs_serve]
MARK = "/data1/instant-marker.txt"
MARK_TEXT = b"written before the freeze of the backup\n"


def _repo_fingerprint(repo: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in repo.rglob("*") if p.is_file() and p.parent.name != "locks"}


@pytest.fixture(scope="module")
def point(lab_vm: LabVm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A full backup of the lab VM taken after MARK was written and synced."""
    base = tmp_path_factory.mktemp("instant")
    repo = base / "repo"
    assert run_cli("init", repo).returncode == 0
    with GuestAgent(lab_vm.agent_socket, timeout=30.0) as ga:
        ga.file_write(MARK, MARK_TEXT)
        assert ga.exec_wait("/bin/sync", timeout=30.0)[0] == 0
    env = cli_env(SNAPFERRY_WORK_DIR=str(base / "work"))
    p = run_cli("backup", lab_vm.uri, "--repo", repo, "--json", "--quiesce", "required",
                env=env)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    yield {"repo": repo, "id": doc["backup_id"], "base": base}


def test_served_lab_disk_reads_back_identical_to_restore(point: dict[str, Any]) -> None:
    repo, bid, base = point["repo"], point["id"], point["base"]
    sock_dir = Path(tempfile.mkdtemp(prefix="sfin-"))
    for disk in ("disk0", "disk1"):
        restored = base / f"{disk}.restored.raw"
        p = run_cli("restore", bid, "--repo", repo, "--disk", disk, "--to", restored)
        assert p.returncode == 0, p.stderr
        with serving(repo, bid, "--disk", disk, "--socket", str(sock_dir / "s.sock")) as s:
            copied = base / f"{disk}.nbdcopy.raw"
            labcheck.nbd_to_raw(s.uri, copied)
            r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                str(restored), s.uri], capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr
        assert hashlib.sha256(copied.read_bytes()).digest() == \
            hashlib.sha256(restored.read_bytes()).digest()
        ok, out = labcheck.fsck_clean(copied)
        assert ok, out
    assert labcheck.read_file(base / "disk1.nbdcopy.raw", "/instant-marker.txt") == MARK_TEXT


def test_files_lists_and_extracts_from_the_lab_point(point: dict[str, Any]) -> None:
    repo, bid, base = point["repo"], point["id"], point["base"]
    p = run_cli("files", bid, "--disk", "disk1", "ls", "/", "--repo", repo, "--json")
    assert p.returncode == 0, p.stderr
    names = {e["name"] for e in json.loads(p.stdout)["entries"]}
    assert "instant-marker.txt" in names and "lost+found" in names
    out = base / "marker.out"
    p = run_cli("files", bid, "--disk", "disk1", "get", MARK.removeprefix("/data1"),
                "--to", out, "--repo", repo)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == MARK_TEXT
    tree = base / "w-tree"
    p = run_cli("files", bid, "--disk", "disk0", "get", "/w", "--to", tree, "--repo", repo)
    assert p.returncode == 0, p.stderr
    raw = base / "disk0.restored.raw"
    if not raw.exists():
        assert run_cli("restore", bid, "--repo", repo, "--disk", "disk0",
                       "--to", raw).returncode == 0
    got = sorted(x.name for x in (tree / "w").iterdir())
    assert got == sorted(labcheck.list_dir(raw, "/w"))
    for name in got[:8]:
        assert (tree / "w" / name).read_bytes() == labcheck.read_file(raw, f"/w/{name}")


class Instant:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([*snapferry_exe(), "instant", *args, "--json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env or cli_env(), cwd=ROOT)

    def event(self, timeout: float = 240) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=60)
            raise AssertionError(f"instant exited {self.proc.returncode}: {err}")
        doc: dict[str, Any] = json.loads(line)
        return doc


def _job(qmp_socket: str) -> dict[str, Any] | None:
    q = Qmp(qmp_socket, timeout=10.0)
    try:
        jobs = [j for j in q.cmd("query-block-jobs") if j["device"] == "sf-lr0"]
        return jobs[0] if jobs else None
    finally:
        q.close()


def _wait_mid_copy(qmp_socket: str, proc: subprocess.Popen[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "instant exited before the copy started"
        j = _job(qmp_socket)
        if j is not None and j["offset"] > 0 and not j.get("ready"):
            return j
        time.sleep(0.05)
    raise AssertionError("the copy job never showed progress")


def test_instant_boot_interrupted_then_resumed_live_restore(point: dict[str, Any]) -> None:
    repo, bid = point["repo"], point["id"]
    lab_dir = Path(tempfile.mkdtemp(prefix="sfinst-"))
    first, second = lab_dir / "lr1", lab_dir / "lr2"
    first.mkdir()
    second.mkdir()
    before = _repo_fingerprint(repo)
    try:
        # 1. boot from the restore point; the copy (throttled) is interrupted mid-way
        t0 = time.monotonic()
        run = Instant(bid, "--repo", str(repo), "--lab-dir", str(lab_dir / "vm"),
                      "--live-restore", str(first), "--restore-speed", "1M")
        booted = run.event()
        instant_s = time.monotonic() - t0
        assert booted["event"] == "booted"
        with GuestAgent(booted["agent"], timeout=30.0) as ga:
            ga.call("guest-ping")
            assert ga.file_read(MARK) == MARK_TEXT  # written before the backup's freeze
            ga.file_write("/data1/after-boot.txt", b"guest write on the overlay\n")
            assert ga.exec_wait("/bin/sync", timeout=30.0)[0] == 0
        _wait_mid_copy(booted["qmp"], run.proc)
        run.proc.send_signal(signal.SIGTERM)
        _, err = run.proc.communicate(timeout=120)
        assert run.proc.returncode != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("snapferry: interrupted"), err
        assert "cancelled" in lines[0] and "disk0.qcow2" in lines[0], lines[0]
        assert list(first.iterdir()) == [], "a cancelled copy leaves no target behind"
        assert not (lab_dir / "vm" / "qemu.pid").exists()
        for pid in (d["nbdkit_pid"] for d in booted["disks"]):
            assert not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"

        # 2. boot again on the same overlays; kill an export mid-copy; finish
        run = Instant(bid, "--repo", str(repo), "--lab-dir", str(lab_dir / "vm"),
                      "--live-restore", str(second), "--restore-speed", "4M",
                      "--restore-delay", "2")
        booted = run.event()
        vm = LabVm(lab_dir=lab_dir / "vm", qmp_socket=booted["qmp"],
                   agent_socket=booted["agent"], control_socket=booted["control"],
                   pid=booted["pid"], disks=[], accel="?")
        with GuestAgent(booted["agent"], timeout=30.0) as ga:
            assert ga.file_read("/data1/after-boot.txt") == b"guest write on the overlay\n"
        t_restore = time.monotonic()
        with guest_ticker(vm, "/data1/tick.log") as ticks:
            _wait_mid_copy(booted["qmp"], run.proc)
            os.kill(booted["disks"][0]["nbdkit_pid"], signal.SIGKILL)  # the serving process
            restored = run.event()
            restore_s = time.monotonic() - t_restore
        assert restored["event"] == "restored", restored
        assert restored["export_restarts"] >= 1
        code = run.proc.wait(60)
        _, err = run.proc.communicate()
        assert code == 0, err
        assert "restarting it" in err
        q = Qmp(booted["qmp"], timeout=30.0)
        try:
            blocks = [b["inserted"] for b in q.cmd("query-block") if b.get("inserted")]
            assert [b["node-name"] for b in blocks] == ["sf-lr0", "sf-lr1"]
            assert [b["file"] for b in blocks] == [str(second / "disk0.qcow2"),
                                                   str(second / "disk1.qcow2")]
            assert all("backing-image" not in b["image"] for b in blocks)
            assert q.cmd("query-status")["status"] == "running"
            names = {n["node-name"] for n in q.cmd("query-named-block-nodes", {"flat": True})}
            assert not any(n.startswith("lab-") for n in names), names
        finally:
            q.close()
        for d in booted["disks"]:  # serving stopped; the VM does not notice
            assert not Path(d["export"].split("socket=")[1]).exists()
        with GuestAgent(booted["agent"], timeout=30.0) as ga:
            ga.file_write("/data1/after-restore.txt", b"on the local disk\n")
            assert ga.exec_wait("/bin/sync", timeout=30.0)[0] == 0
            assert ga.fsfreeze_freeze() >= 1
            try:
                raw = lab_dir / "check.raw"
                labcheck.image_to_raw(second / "disk1.qcow2", raw)
            finally:
                ga.fsfreeze_thaw()
        ok, out = labcheck.fsck_clean(raw)
        assert ok, out
        assert labcheck.read_file(raw, "/after-restore.txt") == b"on the local disk\n"
        assert labcheck.read_file(raw, "/instant-marker.txt") == MARK_TEXT
        assert labcheck.read_file(raw, "/after-boot.txt") == b"guest write on the overlay\n"
        print(f"\ninstant boot to agent {instant_s:.1f} s; live restore {restore_s:.1f} s "
              f"(4 MiB/s cap), max guest write gap {max_gap_ms(ticks):.0f} ms")
    finally:
        lab_down(lab_dir / "vm")
        assert _repo_fingerprint(repo) == before, "the repository must stay untouched"


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _state(lab: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((lab / "instant.json").read_text())
    return doc


def _nbdkit_pids(lab: Path) -> list[int]:
    return [d["nbdkit_pid"] for d in _state(lab)["disks"] if d["nbdkit_pid"]]


def _guest_write(agent: str, path: str, data: bytes) -> None:
    with GuestAgent(agent, timeout=60.0) as ga:
        ga.file_write(path, data)
        assert ga.exec_wait("/bin/sync", timeout=60.0)[0] == 0


def test_instant_process_sigkilled_at_three_moments_is_taken_over(
        point: dict[str, Any]) -> None:
    """SIGKILL of ``snapferry instant`` itself: during the boot, mid-copy, after the
    switch. Each time the VM keeps running with its disks served (the exports are not
    tied to the killed process), the next ``instant`` says what it found and takes
    over; at the end the VM runs on local disks holding every guest write, no process
    is left, and the repository is unchanged (no new file, verify --read-data ok)."""
    repo, bid = point["repo"], point["id"]
    base = Path(tempfile.mkdtemp(prefix="sfkill-"))
    lab, target = base / "vm", base / "lr"
    target.mkdir()
    before = _repo_fingerprint(repo)
    seen_nbdkit: set[int] = set()
    common = ("--repo", str(repo), "--lab-dir", str(lab))
    try:
        # 1. killed during the boot: QEMU started, the agent not answering yet
        run = Instant(bid, *common)
        deadline = time.monotonic() + 120
        while not (lab / "qemu.pid").exists() or not (lab / "instant.json").exists():
            assert run.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        _kill(run.proc)
        qemu_pid = int((lab / "qemu.pid").read_text())
        assert process_alive(qemu_pid), "the VM keeps running"
        orphans = _nbdkit_pids(lab)
        assert len(orphans) == 2 and all(process_alive(p) for p in orphans), \
            "the exports outlive the killed instant process"
        seen_nbdkit.update(orphans)
        held = [h for _, h in live_locks(Repository.open(repo).backend)]
        assert {h["pid"] for h in held} == set(orphans), \
            ("nbdkit holds the shared lock", [(x.name, x.read_text()) for x in
                                              (repo / "locks").glob("*")])

        # 2. taken over (waits for the boot), then killed mid-copy
        run = Instant(bid, *common, "--live-restore", str(target), "--restore-speed", "1M")
        booted = run.event()
        assert booted["event"] == "booted" and booted["reattached"] is True
        assert booted["pid"] == qemu_pid
        notes = " | ".join(booted["notes"])
        assert "taking it over" in notes and "was stopped; serving it again" in notes, notes
        assert not any(process_alive(p) for p in orphans)
        vm = LabVm(lab_dir=lab, qmp_socket=booted["qmp"], agent_socket=booted["agent"],
                   control_socket=booted["control"], pid=qemu_pid, disks=[], accel="?")
        with GuestAgent(booted["agent"], timeout=30.0) as ga:
            assert ga.file_read(MARK) == MARK_TEXT
        with guest_ticker(vm, "/data1/tick.log") as ticks:
            _guest_write(booted["agent"], "/data1/k1.txt", b"before the mid-copy kill\n")
            j1 = _wait_mid_copy(booted["qmp"], run.proc)
            _kill(run.proc)
            seen_nbdkit.update(_nbdkit_pids(lab))
            # no instant process now: the guest still writes, the copy still runs
            _guest_write(booted["agent"], "/data1/k2.txt", b"while no instant ran\n")
            deadline = time.monotonic() + 30
            j2 = _job(booted["qmp"])
            while j2 is not None and j2["offset"] <= j1["offset"] and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
                j2 = _job(booted["qmp"])
            assert j2 is not None and j2["offset"] > j1["offset"], (j1, j2)
            assert all(process_alive(p) for p in _nbdkit_pids(lab))

            # 3. taken over: the copy is adopted (its speed lifted); killed after the switch
            run = Instant(bid, *common, "--live-restore", str(target),
                          env=cli_env(SNAPFERRY_FAULT=faults.spec(instant_kill="switched")))
            booted = run.event()
            notes = " | ".join(booted["notes"])
            assert "is still running in QEMU" in notes, notes
            run.proc.communicate(timeout=240)
            assert run.proc.returncode == -signal.SIGKILL
            seen_nbdkit.update(_nbdkit_pids(lab))
            q = Qmp(booted["qmp"], timeout=30.0)
            try:
                nodes = [b["inserted"]["node-name"] for b in q.cmd("query-block")
                         if b.get("inserted")]
                assert nodes == ["sf-lr0", "sf-lr1"], nodes
                assert q.cmd("query-status")["status"] == "running"
            finally:
                q.close()
            _guest_write(booted["agent"], "/data1/k3.txt", b"after the switch\n")

            # 4. taken over once more: finishes (closes the overlays, stops serving)
            run = Instant(bid, *common, "--live-restore", str(target))
            booted = run.event()
            notes = " | ".join(booted["notes"])
            assert notes.count("already runs on its local copy") == 2, notes
            restored = run.event()
            assert restored["event"] == "restored", restored
            assert run.proc.wait(60) == 0
        q = Qmp(booted["qmp"], timeout=30.0)
        try:
            names = {n["node-name"] for n in q.cmd("query-named-block-nodes", {"flat": True})}
            assert not any(n.startswith("lab-") for n in names), names
            assert q.cmd("query-status")["status"] == "running"
        finally:
            q.close()
        assert _state(lab)["local"] == [str(target / "disk0.qcow2"), str(target / "disk1.qcow2")]
        assert not [p for p in seen_nbdkit if process_alive(p)], "an nbdkit process is left"
        assert not list(lab.glob("nbd-*.sock"))
        tick_text = b""
        with GuestAgent(booted["agent"], timeout=30.0) as ga:
            tick_text = ga.file_read("/data1/tick.log")
            assert ga.exec_wait("/bin/sync", timeout=30.0)[0] == 0
            assert ga.fsfreeze_freeze() >= 1
            try:
                raw = base / "check.raw"
                labcheck.image_to_raw(target / "disk1.qcow2", raw)
            finally:
                ga.fsfreeze_thaw()
        ok, out = labcheck.fsck_clean(raw)
        assert ok, out
        assert labcheck.read_file(raw, "/instant-marker.txt") == MARK_TEXT
        assert labcheck.read_file(raw, "/k1.txt") == b"before the mid-copy kill\n"
        assert labcheck.read_file(raw, "/k2.txt") == b"while no instant ran\n"
        assert labcheck.read_file(raw, "/k3.txt") == b"after the switch\n"
        assert labcheck.read_file(raw, "/tick.log") == tick_text  # every tick on the copy
        console = (lab / "console.log").read_text(errors="replace")
        assert "I/O error" not in console and "EXT4-fs error" not in console, console[-2000:]
        up = [float(x) for x in tick_text.split()]
        assert len(up) > 20 and up == sorted(up)
        print(f"\nkills: largest guest write gap across three takeovers "
              f"{max_gap_ms(ticks):.0f} ms over {len(ticks)} ticks")
    finally:
        lab_down(lab)
        for p in seen_nbdkit:
            if process_alive(p):
                os.kill(p, signal.SIGKILL)
    assert _repo_fingerprint(repo) == before, "the repository must stay untouched"
    assert not list((repo / "locks").glob("*")), "no lock object is left behind"
    v = run_cli("verify", "--repo", repo, "--read-data")
    assert v.returncode == 0, v.stdout + v.stderr
