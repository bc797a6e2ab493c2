"""Hard failures on the VM side, on the real lab VM (TCG, real qemu-ga): a backup process
SIGKILLed at every lifecycle point, a guest left frozen, guest writes in an overlay the
VM no longer runs on, two backups of one VM at once, a kill after the overlay merge.

Every case drives the real ``snapferry`` CLI in a subprocess; the kills are real
SIGKILLs at named fault points (``snapferry.engine.faults``). After each one,
``snapferry cleanup VM`` must bring the VM back to its base disks, thawed, with no
export, job, lock or stray bitmap, and the next backup must work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from coordvm import (
    SNAPFERRY,
    RecordingHv,
    check_restore_point,
    cli,
    count_backups,
    make_hv,
    new_repo,
    run,
    vm_name,
    vm_work_dir,
    write_known,
)
from labvm import assert_vm_clean, bitmaps, lab_vm

from snapferry.engine import faults
from snapferry.engine.errors import HypervisorError, QuiesceError
from snapferry.engine.faults import FAULT_ENV, PHASES
from snapferry.engine.hypervisor import BackupMode, ParentDisk
from snapferry.engine.qemu.agent import GuestAgent
from snapferry.engine.qemu.backend import OVERLAY_SUFFIX
from snapferry.engine.store.repo import Repository
from snapferry.lab import check as labcheck
from snapferry.lab.vm import LabVm, lab_down, lab_up, lab_write

pytestmark = pytest.mark.vm
__all__ = ["lab_vm"]


@pytest.fixture(scope="module")
def shared(lab_vm: LabVm, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Path, Repository]]:
    """One work dir + repository for the module (each case ends with a good backup)."""
    tmp = tmp_path_factory.mktemp("crashes")
    with pytest.MonkeyPatch.context() as mp:
        work = vm_work_dir(lab_vm, tmp, mp)
        r = new_repo(tmp)
        run(lab_vm, work, r)
        yield work, r


def freeze_status(vm: LabVm) -> str:
    with GuestAgent(vm.agent_socket, timeout=30.0) as ga:
        return ga.fsfreeze_status()


def wait_thawed(vm: LabVm, deadline_s: float = 60.0) -> str:
    """The guest's freeze status once it is thawed, or the last one at the deadline."""
    end = time.monotonic() + deadline_s
    status = freeze_status(vm)
    while status != "thawed" and time.monotonic() < end:
        time.sleep(0.2)
        status = freeze_status(vm)
    return status


def killed_backup(vm: LabVm, repo: Repository, point: str) -> None:
    p = cli(["backup", vm.uri, "--repo", str(repo.path), "--quiesce", "required",
             "--workers", "1"], env_extra={FAULT_ENV: faults.spec(**{point: "sigkill"})})
    assert p.returncode == -signal.SIGKILL, (point, p.returncode, p.stderr)


def cleanup_json(vm: LabVm) -> dict[str, object]:
    p = cli(["cleanup", vm.uri, "--json"])
    assert p.returncode == 0, p.stderr
    doc: dict[str, object] = json.loads(p.stdout)
    return doc


def snapferry_bitmaps(vm: LabVm, node: str) -> list[str]:
    return sorted(n for n in bitmaps(vm, node) if n.startswith("snapferry-"))


# -- item 2: a guest frozen by a backup that died ---------------------------------------


def test_sigkill_right_after_freeze_is_thawed_by_the_watchdog(
        lab_vm: LabVm, shared: tuple[Path, Repository]) -> None:
    work, repo = shared
    killed_backup(lab_vm, repo, "after_quiesce")
    # before the watchdog: still "frozen" after 60 s, until another backup ran
    assert wait_thawed(lab_vm) == "thawed"
    log = (work / "thaw-watchdog.log").read_text()
    assert "went away while the guest was frozen" in log and "thawed" in log, log
    cleanup_json(lab_vm)
    assert_vm_clean(lab_vm, work, unlocked=True)


def test_freeze_window_limit(lab_vm: LabVm, shared: tuple[Path, Repository]) -> None:
    """A backup that stalls with the guest frozen past ``freeze_limit``: the watchdog
    thaws it, and that backup is not called quiesced."""
    work, repo = shared

    class StallingHv(RecordingHv):
        def snapshot(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> None:
            end = time.monotonic() + 60
            while freeze_status(lab_vm) == "frozen" and time.monotonic() < end:
                time.sleep(0.2)  # the stall: until the watchdog steps in
            super().snapshot(mode, parents)

    hv = StallingHv(lab_vm.qmp_socket, lab_vm.agent_socket, work_dir=work,
                    name=vm_name(lab_vm), freeze_limit=1.0)
    before = count_backups(repo)
    with pytest.raises(QuiesceError, match="watchdog thawed the guest first"):
        run(lab_vm, work, repo, quiesce="required", retries=0, hv=hv)
    assert count_backups(repo) == before
    assert_vm_clean(lab_vm, work, unlocked=True)


# -- item 2 (cleanup) and item 11 (kill after the merge): a SIGKILL at each point ------------


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_each_point_then_cleanup(lab_vm: LabVm, shared: tuple[Path, Repository],
                                            phase: str) -> None:
    work, repo = shared
    before = count_backups(repo)
    nodes = ("lab-disk0", "lab-disk1")
    bitmaps_before = {node: snapferry_bitmaps(lab_vm, node) for node in nodes}
    killed_backup(lab_vm, repo, f"after_{phase}")
    assert wait_thawed(lab_vm) == "thawed"  # the watchdog, whatever the point
    doc = cleanup_json(lab_vm)
    print(f"after-{phase}: cleanup did {doc['actions']}")
    assert_vm_clean(lab_vm, work, unlocked=True)
    assert count_backups(repo) == before
    for node in nodes:
        # no stray bitmap: exactly the ones before the kill (the killed round's merged
        # back into its parent's), all recording and consistent
        assert snapferry_bitmaps(lab_vm, node) == bitmaps_before[node], (phase, node)
        for b in bitmaps(lab_vm, node).values():
            assert b.get("recording") and not b.get("inconsistent"), (phase, node, b)
    marker = write_known(lab_vm, f"after-kill-{phase}", 1, 4096)
    r = run(lab_vm, work, repo)
    # the parent's bitmap was put back: an incremental, also after a kill after the merge
    assert r.backup.mode == "incremental", (phase, r.backup.disks)
    check_restore_point(repo, r.backup.backup_id, marker, work)
    assert_vm_clean(lab_vm, work, unlocked=True)


def test_kill_after_merge_next_backup_incremental_without_cleanup(
        lab_vm: LabVm, shared: tuple[Path, Repository]) -> None:
    """Item 11: the next backup itself (no cleanup run) puts the bitmaps back."""
    work, repo = shared
    bitmaps_before = {n: snapferry_bitmaps(lab_vm, n) for n in ("lab-disk0", "lab-disk1")}
    killed_backup(lab_vm, repo, "after_merge")
    marker = write_known(lab_vm, "after-merge-kill", 1, 4096)
    r = run(lab_vm, work, repo)
    assert r.backup.mode == "incremental", r.backup.disks
    assert all(d.full_reason is None for d in r.backup.disks)
    check_restore_point(repo, r.backup.backup_id, marker, work)
    latest = repo.load_manifest(r.backup.backup_id)
    for d in latest.disks:  # the new round's bitmap replaced its parent's: no pile-up
        node = f"lab-{d.name}"
        assert d.tracking["bitmap"] in snapferry_bitmaps(lab_vm, node)
        assert len(snapferry_bitmaps(lab_vm, node)) == len(bitmaps_before[node])
    assert_vm_clean(lab_vm, work, unlocked=True)


def test_kill_after_commit_next_backup_incremental(
        lab_vm: LabVm, shared: tuple[Path, Repository]) -> None:
    """Item 11: SIGKILL after the restore point is committed, before the bitmap
    bookkeeping (the parent's bitmap still disabled, the new one recording): the next
    backup chains to the killed round's restore point, incrementally (it used to merge
    the new bitmap away and fall back to a full), with no bitmap pile-up."""
    work, repo = shared
    bitmaps_before = {n: snapferry_bitmaps(lab_vm, n) for n in ("lab-disk0", "lab-disk1")}
    n_before = count_backups(repo)
    killed_backup(lab_vm, repo, "after_commit")
    assert count_backups(repo) == n_before + 1  # the killed round's point is there
    killed = max(repo.list_backups(), key=lambda m: m.backup_id)
    marker = write_known(lab_vm, "after-commit-kill", 1, 4096)
    r = run(lab_vm, work, repo)
    assert r.backup.mode == "incremental", r.backup.disks
    assert r.backup.parent == killed.backup_id
    assert all(d.full_reason is None for d in r.backup.disks)
    check_restore_point(repo, r.backup.backup_id, marker, work)
    latest = repo.load_manifest(r.backup.backup_id)
    for d in latest.disks:
        node = f"lab-{d.name}"
        assert d.tracking["bitmap"] in snapferry_bitmaps(lab_vm, node)
        assert len(snapferry_bitmaps(lab_vm, node)) == len(bitmaps_before[node])
    assert_vm_clean(lab_vm, work, unlocked=True)


# -- item 3: two backups of one VM through its two QMP monitors ----------------------------


def test_second_backup_of_the_same_vm_refuses(lab_vm: LabVm, shared: tuple[Path, Repository],
                                              tmp_path: Path) -> None:
    work, repo = shared
    other = new_repo(tmp_path, "other")
    stall = tmp_path / "stall.pids"
    env = dict(os.environ, **{FAULT_ENV: faults.spec(worker_stall=f"1@{stall}")})
    env.pop("SNAPFERRY_DEBUG", None)
    first = subprocess.Popen(
        [str(SNAPFERRY), "backup", lab_vm.uri, "--repo", str(repo.path), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    try:
        end = time.monotonic() + 120
        while not (stall.exists() and stall.read_text().strip()) and time.monotonic() < end:
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        parent_bitmaps = snapferry_bitmaps(lab_vm, "lab-disk0")
        # the same VM through its second monitor, into another repository
        second_uri = f"qemu+unix://{lab_vm.control_socket}?agent={lab_vm.agent_socket}"
        p = cli(["backup", second_uri, "--repo", str(other.path)])
        err = p.stderr.strip()
        assert p.returncode == 1, (p.returncode, err)
        assert len(err.splitlines()) == 1 and "another snapferry process" in err, err
        assert count_backups(other) == 0
        # the first backup was not disturbed: its overlay and export are still there
        assert snapferry_bitmaps(lab_vm, "lab-disk0") == parent_bitmaps
        assert list(work.glob(f"*{OVERLAY_SUFFIX}"))
    finally:
        os.killpg(first.pid, signal.SIGINT)
        _out, err1 = first.communicate(timeout=120)
    assert first.returncode == 130, err1
    assert_vm_clean(lab_vm, work, unlocked=True)
    r = run(lab_vm, work, repo)
    assert r.backup.mode == "incremental"
    assert_vm_clean(lab_vm, work, unlocked=True)


def test_lock_of_a_live_backup_in_this_process(lab_vm: LabVm,
                                               shared: tuple[Path, Repository]) -> None:
    work, _repo = shared
    a = make_hv(lab_vm, work)
    # a QMP socket serves one client at a time: the second object uses the other monitor
    b = RecordingHv(lab_vm.control_socket, lab_vm.agent_socket, work_dir=work,
                    name=vm_name(lab_vm))
    try:
        a.inspect()
        with pytest.raises(HypervisorError, match="another snapferry process"):
            b.inspect()
    finally:
        a.close()
        b.close()
    c = make_hv(lab_vm, work)
    try:
        c.inspect()  # released by close()
    finally:
        c.close()


# -- item 1: guest writes in an overlay the VM no longer runs on -----------------------------
# Runs last in this module: it restarts the shared lab VM (same sockets and disks).


def test_guest_writes_after_a_kill_and_a_vm_restart_are_kept(
        lab_vm: LabVm, shared: tuple[Path, Repository], tmp_path: Path) -> None:
    work, repo = shared
    killed_backup(lab_vm, repo, "after_export")  # mid-copy: the guest runs on the overlay
    text = b"written by the guest after the backup was killed\n"
    lab_write("/data0/after-crash.txt", text, lab_vm.lab_dir)
    overlays = sorted(work.glob(f"disk0-*{OVERLAY_SUFFIX}"))
    assert len(overlays) == 1
    lab_down(lab_vm.lab_dir)  # the overlay holds the write; QEMU forgets the overlay
    lab_vm.pid = lab_up(lab_vm.lab_dir).pid
    try:
        # before: failed ("NBD server not running", a stale state file) and deleted the
        # overlay holding the write
        p = cli(["backup", lab_vm.uri, "--repo", str(repo.path), "--json"])
        assert p.returncode == 0, p.stderr
        assert overlays[0].exists(), "an overlay holding guest writes was deleted"
        raw = labcheck.image_to_raw(overlays[0], tmp_path / "kept.raw")
        assert labcheck.read_file(raw, "/after-crash.txt") == text
        doc = cleanup_json(lab_vm)
        assert any("kept overlay" in str(a) for a in doc["actions"]), doc  # type: ignore[attr-defined]
        assert overlays[0].exists()
    finally:
        for f in work.glob(f"*{OVERLAY_SUFFIX}"):
            f.unlink()  # the test's own leftovers: the next tests expect none
    assert_vm_clean(lab_vm, work, unlocked=True)
    marker = write_known(lab_vm, "after-restart", 1, 4096)
    r = run(lab_vm, work, repo)
    check_restore_point(repo, r.backup.backup_id, marker, work)
