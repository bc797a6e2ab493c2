"""The fleecing strategy (``QemuFleecingHypervisor``) end to end on the real lab VM.

Nothing is mocked except where said: QEMU (TCG) with its real backup job / copy-before-
write filter and NBD server, qemu-ga, the project's NBD client, the reader pool and a
real repository. Covered: a full and an incremental while the guest writes, including a
file rewritten by the guest DURING the copy (the restore point must hold the old bytes:
that is what copy-before-write is for, and the next backup the new ones); incrementals
chaining across the overlay and fleecing strategies; a reader failing mid-copy
(``coordvm.FlakySource``, the one mock boundary: a made-up read error on a real
source); SIGTERM to a real backup process mid-copy; and a side-by-side measurement of
both strategies on the same VM (printed, never asserted on).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from coordvm import (
    HookProgress,
    check_restore_point,
    count_backups,
    flaky_opener,
    guest_ticker,
    make_hv,
    max_gap_ms,
    new_repo,
    payload,
    vm_name,
    vm_work_dir,
    write_known,
)
from labvm import assert_vm_clean, bitmaps, control, lab_vm

from snapferry.engine.coordinator import VmBackupOptions, VmBackupResult, backup_vm
from snapferry.engine.errors import SourceError
from snapferry.engine.hypervisor import BackupMode, DiskPlan, ParentDisk
from snapferry.engine.progress import Progress
from snapferry.engine.qemu.backend import QemuHypervisor, SourceOpener
from snapferry.engine.qemu.fleecing import FLEECE_NODE_PREFIX, FLEECE_SUFFIX, QemuFleecingHypervisor
from snapferry.engine.store.repo import Repository
from snapferry.lab.vm import LabVm, lab_write

pytestmark = pytest.mark.vm
__all__ = ["lab_vm"]  # the session fixture, imported for pytest

ROOT = Path(__file__).resolve().parent.parent
TICK_LOG = "/data0/fleece-tick.log"


class RecordingFleecingHv(QemuFleecingHypervisor):
    """The real fleecing backend; only remembers the plans ``export`` made."""

    plans: list[DiskPlan]

    def export(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> list[DiskPlan]:
        self.plans = super().export(mode, parents)
        return self.plans


def make_fhv(vm: LabVm, work: Path, *, source_opener: SourceOpener | None = None
             ) -> RecordingFleecingHv:
    return RecordingFleecingHv(vm.qmp_socket, vm.agent_socket, work_dir=work,
                               name=vm_name(vm), source_opener=source_opener)


def run_hv(hv: QemuHypervisor, repo: Repository, *, mode: BackupMode = "auto",
           progress: Progress | None = None) -> VmBackupResult:
    try:
        opts = VmBackupOptions(mode=mode, quiesce="required", retries=1, workers=2,
                               verify="full")
        if progress is not None:
            opts.progress = progress
        return backup_vm(hv, repo, opts)
    finally:
        hv.close()


def assert_clean(vm: LabVm, work: Path) -> None:
    """The lifecycle's hard rule, plus: no fleece node, job or image of ours."""
    assert_vm_clean(vm, work)
    q = control(vm)
    try:
        names = {n["node-name"] for n in q.cmd("query-named-block-nodes", {"flat": True})}
        assert not any(n.startswith(FLEECE_NODE_PREFIX) for n in names), names
        # only the disks' own nodes: no copy-before-write filter left in the graph
        assert all(n.startswith("lab-") for n in names), names
    finally:
        q.close()
    assert list(work.glob(f"*{FLEECE_SUFFIX}")) == []











@pytest.fixture
def work(lab_vm: LabVm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return vm_work_dir(lab_vm, tmp_path, monkeypatch)


def test_full_and_incremental_with_writes_during_the_copy(
    lab_vm: LabVm, work: Path, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    expected = write_known(lab_vm, "fl0", 3)
    late = "/data0/fl-late.txt"
    old_late = payload("fl-late-old", 48 * 1024)
    lab_write(late, old_late, lab_dir=lab_vm.lab_dir, sync=True)
    expected["/fl-late.txt"] = old_late

    # Full: after the snapshot and before the reader pool reads anything (the copy's
    # progress start), the guest rewrites a file; a ticker writes all along.
    new_late = payload("fl-late-new", 48 * 1024)

    def rewrite() -> None:  # the guest is thawed and writes to its live disk here
        assert hv0.plans, "the hook must run after export, before the copy"
        lab_write(late, new_late, lab_dir=lab_vm.lab_dir, sync=True)

    hv0 = make_fhv(lab_vm, work)
    with guest_ticker(lab_vm, TICK_LOG) as ticks:
        r0 = run_hv(hv0, repo, progress=HookProgress(on_start={"backup": rewrite}))
    print(f"fleecing full: freeze {r0.freeze_ms} ms, phases {r0.phase_seconds}, "
          f"largest guest write gap {max_gap_ms(ticks):.0f} ms")
    assert_clean(lab_vm, work)
    assert r0.backup.mode == "full" and r0.committed and r0.consistency == "filesystem"
    assert all(p.meta["strategy"] == "fleecing" for p in hv0.plans)
    # the point in time is the freeze: the rewrite made before any read is NOT in it
    # (copy-before-write moved the old clusters into the fleece image)
    check_restore_point(repo, r0.backup.backup_id, expected, scratch)
    check_restore_point(repo, r0.backup.backup_id, {}, scratch, disk="disk1")

    # Incremental: reads only what the (disabled) parent bitmap names, and holds the
    # rewrite made during the previous copy plus new files.
    expected["/fl-late.txt"] = new_late
    expected.update(write_known(lab_vm, "fl1", 2))
    hv1 = make_fhv(lab_vm, work)
    with guest_ticker(lab_vm, TICK_LOG) as ticks:
        r1 = run_hv(hv1, repo)
    print(f"fleecing incremental: freeze {r1.freeze_ms} ms, phases {r1.phase_seconds}, "
          f"read {r1.backup.bytes_read} B, largest guest write gap {max_gap_ms(ticks):.0f} ms")
    assert_clean(lab_vm, work)
    m1 = repo.load_manifest(r1.backup.backup_id)
    assert m1.mode == "incremental" and m1.parent == r0.backup.backup_id
    full_read = {d.name: d.bytes_read for d in r0.backup.disks}
    plans = {p.name: p for p in hv1.plans}
    for d in r1.backup.disks:
        assert plans[d.name].changed is not None
        assert d.bytes_read < full_read[d.name] or full_read[d.name] == 0, d
    check_restore_point(repo, r1.backup.backup_id, expected, scratch)

    # Chained bookkeeping identical to the overlay path: the newest bitmap records, the
    # old ones are gone; and the overlay strategy takes over the chain (and back).
    bm = bitmaps(lab_vm)
    b1 = m1.disks[0].tracking["bitmap"]
    assert bm[b1]["recording"] is True
    assert repo.load_manifest(r0.backup.backup_id).disks[0].tracking["bitmap"] not in bm
    expected.update(write_known(lab_vm, "fl2", 1))
    r2 = run_hv(make_hv(lab_vm, work), repo)  # overlay strategy, parent made by fleecing
    assert r2.backup.mode == "incremental"
    check_restore_point(repo, r2.backup.backup_id, expected, scratch)
    expected.update(write_known(lab_vm, "fl3", 1))
    r3 = run_hv(make_fhv(lab_vm, work), repo)  # fleecing, parent made by overlay
    assert r3.backup.mode == "incremental"
    assert repo.load_manifest(r3.backup.backup_id).parent == r2.backup.backup_id
    check_restore_point(repo, r3.backup.backup_id, expected, scratch)
    assert_clean(lab_vm, work)


def next_backup_ok(vm: LabVm, work: Path, repo: Repository, before: int) -> None:
    """After a fault: clean VM, no restore point, and the next fleecing backup works."""
    assert_clean(vm, work)
    assert count_backups(repo) == before, "a failed backup left a restore point"
    marker = write_known(vm, f"fl-after-{before}-{os.getpid()}", 1, 4096)
    r = run_hv(make_fhv(vm, work), repo)
    assert r.committed and r.consistency == "filesystem"
    assert count_backups(repo) == before + 1
    check_restore_point(repo, r.backup.backup_id, marker, work)
    assert_clean(vm, work)


def test_reader_fails_mid_copy(lab_vm: LabVm, work: Path, tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    run_hv(make_fhv(lab_vm, work), repo)
    before = count_backups(repo)
    write_known(lab_vm, "fl-mid", 2, 64 * 1024)
    hv = make_fhv(lab_vm, work, source_opener=flaky_opener(fail_after=1))
    with pytest.raises(SourceError, match="test fault: read at offset") as ei:
        run_hv(hv, repo, mode="full")
    assert "\n" not in str(ei.value).strip()
    next_backup_ok(lab_vm, work, repo, before)


SIGTERM_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from coordvm import HookProgress
from snapferry.engine.coordinator import VmBackupOptions, backup_vm
from snapferry.engine.errors import SnapferryError
from snapferry.engine.qemu.fleecing import QemuFleecingHypervisor
from snapferry.engine.store.repo import Repository

hv = QemuFleecingHypervisor({qmp!r}, {agent!r}, work_dir=Path({work!r}), name={name!r})
prog = HookProgress(on_first_advance=lambda: os.kill(os.getpid(), signal.SIGTERM))
try:
    backup_vm(hv, Repository.open({repo!r}),
              VmBackupOptions(mode="full", quiesce="required", workers=1, progress=prog))
except SnapferryError as e:
    print(f"snapferry: {{e}}", file=sys.stderr)
    sys.exit(130)
finally:
    hv.close()
sys.exit(0)
"""


def test_sigterm_mid_copy(lab_vm: LabVm, work: Path, tmp_path: Path) -> None:
    """A real process running a fleecing backup gets SIGTERM while the readers copy."""
    repo = new_repo(tmp_path)
    run_hv(make_fhv(lab_vm, work), repo)
    before = count_backups(repo)
    script = tmp_path / "sigterm_backup.py"
    script.write_text(SIGTERM_SCRIPT.format(
        tests=str(ROOT / "tests"), qmp=lab_vm.qmp_socket, agent=lab_vm.agent_socket,
        work=str(work), name=vm_name(lab_vm), repo=str(repo.path)))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=dict(os.environ))
    err = p.stderr.strip()
    print(f"sigterm mid-copy -> exit {p.returncode}: {err}")
    assert p.returncode == 130, (p.returncode, p.stdout, p.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "SIGTERM" in err, err
    next_backup_ok(lab_vm, work, repo, before)


@pytest.mark.parametrize("by", ["cleanup", "next-backup"])
def test_leftovers_of_a_dead_process_are_cleared(lab_vm: LabVm, work: Path,
                                                 tmp_path: Path, by: str) -> None:
    """A backend that got as far as exporting the fleece node and then vanished (no
    cleanup, as after SIGKILL): a fresh backend's cleanup(), or the next backup's
    inspect(), clears the job, its filter, the node, the export and the image, and puts
    the parent bitmap back to recording (the next backup is still an incremental)."""
    repo = new_repo(tmp_path)
    r0 = run_hv(make_fhv(lab_vm, work), repo)
    parent_bm = repo.load_manifest(r0.backup.backup_id).disks[0].tracking["bitmap"]
    parents = {d.name: ParentDisk(d.name, d.virtual_size, d.tracking)
               for d in repo.load_manifest(r0.backup.backup_id).disks}
    dead = make_fhv(lab_vm, work)
    dead.inspect()
    dead.quiesce()
    dead.snapshot("auto", parents)
    dead.thaw()
    dead.export("auto", parents)
    dead_bm = dead.plans[0].tracking["bitmap"]
    dead.close()  # the process "dies": nothing cleaned up
    q = control(lab_vm)
    try:
        assert sorted(j["device"] for j in q.cmd("query-block-jobs")) == [
            "sf-fleece-0", "sf-fleece-1"]
        assert len(q.cmd("query-block-exports")) == 2
    finally:
        q.close()
    assert bitmaps(lab_vm)[parent_bm]["recording"] is False
    if by == "cleanup":
        fresh = make_fhv(lab_vm, work)
        try:
            fresh.cleanup()
        finally:
            fresh.close()
        assert_clean(lab_vm, work)
        bm = bitmaps(lab_vm)
        assert bm[parent_bm]["recording"] is True
        assert dead_bm not in bm  # the dead round's bitmap was merged into the parent's
        next_backup_ok(lab_vm, work, repo, count_backups(repo))
    else:
        marker = write_known(lab_vm, "fl-after-dead", 1, 4096)
        r = run_hv(make_fhv(lab_vm, work), repo)
        assert r.backup.mode == "incremental" and r.committed
        check_restore_point(repo, r.backup.backup_id, marker, work)
        assert_clean(lab_vm, work)
        bm = bitmaps(lab_vm)
        assert parent_bm not in bm and dead_bm not in bm


def test_measure_against_the_overlay_path(lab_vm: LabVm, work: Path, tmp_path: Path) -> None:
    """Same VM, same workload: two incrementals per strategy, alternating, while a guest
    loop writes and 1 MiB of files changes before each. Figures are printed (-s); the
    assertions are only that every backup succeeded as an incremental."""
    repo = new_repo(tmp_path)
    run_hv(make_hv(lab_vm, work), repo)
    makers: dict[str, Callable[[], QemuHypervisor]] = {
        "overlay": lambda: make_hv(lab_vm, work),
        "fleecing": lambda: make_fhv(lab_vm, work),
    }
    rows: list[tuple[str, float | None, float, float, float, float]] = []
    for rnd in range(2):
        for strategy, mk in makers.items():
            write_known(lab_vm, f"bench-{strategy}-{rnd}", 4, 256 * 1024)
            hv = mk()
            t0 = time.monotonic()
            with guest_ticker(lab_vm, TICK_LOG) as ticks:
                r = run_hv(hv, repo)
            total = time.monotonic() - t0
            assert r.backup.mode == "incremental" and r.committed
            agent_ms = hv.stats.get("freeze_ms", float("nan"))
            rows.append((strategy, r.freeze_ms, agent_ms, total,
                         r.phase_seconds.get("commit", 0.0), max_gap_ms(ticks)))
            assert_clean(lab_vm, work)
    # freeze_ms: the coordinator's window (quiesce() call to thaw; for fleecing it
    # includes preparing the fleece images, done just before the freeze);
    # agent_ms: from the freeze request to the thaw (the guest-visible freeze).
    print("\nstrategy  freeze_ms  agent_ms  total_s  commit_s  max_guest_write_gap_ms")
    for s, f, a, t, c, g in rows:
        print(f"{s:9} {f!s:>9} {a:9.1f} {t:8.2f} {c:9.3f} {g:10.0f}")
