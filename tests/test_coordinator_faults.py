"""Faults during a VM backup, on the real lab VM: whatever fails, the coordinator leaves
the VM running, thawed, on its base disks, with no overlay, export or job; no restore
point is written for the failed backup; and the next backup succeeds.

Faults are real where they can be: the guest's fsfreeze hook refusing, a guest agent
that never answers (a socket that accepts and stays silent), QEMU's NBD export deleted
under the reader pool, a pack that does not read back as written (verify), QEMU
refusing the commit because another job holds the base node, the QMP connection
closed, signals sent to a real ``snapferry backup`` process, a guest frozen by someone
else, a foreign overlay. Two fault points need a hook: a reader that fails after N reads
(``coordvm.FlakySource`` wraps the real NBD client at the ``DiskSource`` seam) and
signals at a given lifecycle step (the named fault points of ``snapferry.engine.faults``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from coordvm import (
    HookProgress,
    after_fault,
    check_restore_point,
    cli,
    count_backups,
    flaky_opener,
    make_hv,
    new_repo,
    payload,
    run,
    vm_work_dir,
    write_known,
)
from labvm import assert_vm_clean, bitmaps, control, lab_vm, silent_agent  # noqa: F401

from snapferry.engine import faults
from snapferry.engine.errors import (
    CorruptionError,
    HypervisorError,
    QuiesceError,
    SnapferryError,
    SourceError,
)
from snapferry.engine.faults import FAULT_ENV, PHASES
from snapferry.engine.qemu.agent import GuestAgent
from snapferry.engine.store.repo import Repository
from snapferry.engine.verify import verify_repo
from snapferry.lab.vm import LabVm, lab_fail_freeze, lab_write

pytestmark = pytest.mark.vm
__all__ = ["lab_vm"]  # the session fixture, imported for pytest


@pytest.fixture
def work(lab_vm: LabVm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return vm_work_dir(lab_vm, tmp_path, monkeypatch)


@pytest.fixture
def repo(lab_vm: LabVm, work: Path, tmp_path: Path) -> Repository:
    """A repository holding one full restore point of the lab VM (so that a failed
    backup is an incremental with a parent bitmap to keep right)."""
    r = new_repo(tmp_path)
    run(lab_vm, work, r)
    return r


def one_line(msg: str) -> bool:
    return "\n" not in msg.strip() and "Traceback" not in msg


# -- quiesce ------------------------------------------------------------------------------


@pytest.fixture
def failing_freeze(lab_vm: LabVm) -> Iterator[None]:
    lab_fail_freeze(True, lab_vm.lab_dir)
    try:
        yield
    finally:
        lab_fail_freeze(False, lab_vm.lab_dir)


def test_quiesce_required_fails_after_retries(lab_vm: LabVm, work: Path, repo: Repository,
                                              failing_freeze: None) -> None:
    before = count_backups(repo)
    with pytest.raises(QuiesceError) as ei:
        run(lab_vm, work, repo, quiesce="required", retries=1)
    msg = str(ei.value)
    assert "after 2 attempt(s)" in msg and "hook" in msg, msg
    assert one_line(msg)
    lab_fail_freeze(False, lab_vm.lab_dir)
    after_fault(lab_vm, work, repo, before)


def test_quiesce_preferred_falls_back_to_crash_consistent(
    lab_vm: LabVm, work: Path, repo: Repository, failing_freeze: None
) -> None:
    before = count_backups(repo)
    r = run(lab_vm, work, repo, quiesce="preferred", retries=0)
    assert r.consistency == "crash" and r.quiesced is False and r.freeze_ms is None
    assert r.attempts == 2 and any("crash-consistent" in w for w in r.warnings), r.warnings
    m = repo.load_manifest(r.backup.backup_id)
    assert m.consistency == "crash" and m.quiesced is False
    assert m.mode == "incremental"
    assert count_backups(repo) == before + 1
    lab_fail_freeze(False, lab_vm.lab_dir)
    after_fault(lab_vm, work, repo, before + 1)




def test_agent_not_answering_required(lab_vm: LabVm, work: Path, repo: Repository,
                                      silent_agent: str) -> None:  # noqa: F811
    before = count_backups(repo)
    hv = make_hv(lab_vm, work, agent_socket=silent_agent, agent_timeout=1.0)
    with pytest.raises(QuiesceError, match="did not answer") as ei:
        run(lab_vm, work, repo, quiesce="required", retries=0, hv=hv)
    assert one_line(str(ei.value))
    after_fault(lab_vm, work, repo, before)


# -- copy / verify --------------------------------------------------------------------------


def test_reader_fails_mid_copy(lab_vm: LabVm, work: Path, repo: Repository) -> None:
    before = count_backups(repo)
    chunks_before = set(repo.store.iterate())
    write_known(lab_vm, "mid-copy", 4, 64 * 1024)  # something to read in the incremental
    hv = make_hv(lab_vm, work, source_opener=flaky_opener(fail_after=1))
    with pytest.raises(SourceError, match="test fault: read at offset"):
        run(lab_vm, work, repo, mode="full", hv=hv)
    # No partial chunk files, and the repository is still whole. (Chunks a worker stored
    # for a work item that never reported back are left as unreferenced orphans: known,
    # harmless to every restore point, see the report.)
    assert repo.store.temp_files() == []
    assert verify_repo(repo).ok
    print("orphan chunks left by the failed copy:",
          len(set(repo.store.iterate()) - chunks_before))
    after_fault(lab_vm, work, repo, before)


def test_nbd_export_deleted_under_the_readers(lab_vm: LabVm, work: Path,
                                              repo: Repository) -> None:
    """QEMU's export disappears as the copy starts: the readers fail with one line."""
    before = count_backups(repo)

    def kill_export() -> None:
        q = control(lab_vm)
        try:
            for e in q.cmd("query-block-exports"):
                q.cmd("block-export-del", {"id": e["id"], "mode": "hard"})
        finally:
            q.close()

    prog = HookProgress(on_start={"backup": kill_export})
    with pytest.raises(SnapferryError) as ei:
        run(lab_vm, work, repo, mode="full", progress=prog)
    assert prog.fired == ["backup"]
    assert one_line(str(ei.value))
    print("export deleted mid-copy:", ei.value)
    after_fault(lab_vm, work, repo, before)


def test_verify_catches_a_corrupted_chunk(
    lab_vm: LabVm, work: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack this backup wrote does not read back as written (a byte flipped on disk
    right after its save: the ``pack-rot`` fault point): the read-back of ``--verify
    full``, done by each worker right after its save, fails the backup; nothing is
    committed and what the backup stored is removed."""
    before = count_backups(repo)
    old = set(repo.store.iterate())
    write_known(lab_vm, "verify", 4, 64 * 1024)
    monkeypatch.setenv(FAULT_ENV, faults.spec(pack_rot="1"))
    with pytest.raises(CorruptionError) as ei:
        run(lab_vm, work, repo)
    monkeypatch.delenv(FAULT_ENV)
    assert one_line(str(ei.value)) and "written by this backup" in str(ei.value)
    assert set(repo.store.iterate()) == old  # abort removed the packs this backup stored
    after_fault(lab_vm, work, repo, before)


# -- QEMU ------------------------------------------------------------------------------------


def test_qmp_connection_lost_mid_copy(lab_vm: LabVm, work: Path, repo: Repository) -> None:
    before = count_backups(repo)
    hv = make_hv(lab_vm, work)

    def drop_qmp() -> None:
        p = hv._qmp._p  # the backend's live QMP connection
        assert p is not None
        p.close()

    prog = HookProgress(on_first_advance=drop_qmp)
    try:
        r = run(lab_vm, work, repo, hv=hv, progress=prog)
    except HypervisorError as e:  # the connection was needed again before the commit
        assert "QMP connection" in str(e) and one_line(str(e)), e
        print("QMP lost mid-copy:", e)
        after_fault(lab_vm, work, repo, before)
    else:  # or the backend reconnected transparently: then the restore point is whole
        assert r.committed
        after_fault(lab_vm, work, repo, before + 1)
    assert prog.fired == ["advance"]


def test_commit_refused_by_qemu(lab_vm: LabVm, work: Path, repo: Repository) -> None:
    """Another block job on the base node makes QEMU refuse the commit. The VM cannot be
    put back while that job runs (cleanup says so); once it is gone the next backup
    commits the leftover overlay first and succeeds."""
    before = count_backups(repo)
    q = control(lab_vm)

    def start_blocker() -> None:
        disk_size = next(n for n in q.cmd("query-named-block-nodes", {"flat": True})
                         if n.get("node-name") == "lab-disk0")["image"]["virtual-size"]
        q.cmd("blockdev-add", {"driver": "null-co", "node-name": "test-null",
                               "size": disk_size})
        q.cmd("blockdev-backup", {"job-id": "test-blocker", "device": "lab-disk0",
                                  "target": "test-null", "sync": "full", "speed": 1})

    try:
        prog = HookProgress(on_start={"verify": start_blocker})
        with pytest.raises(HypervisorError, match="commit of disk disk0") as ei:
            run(lab_vm, work, repo, progress=prog)
        print("QEMU refused the commit:", ei.value)
        assert one_line(str(ei.value))
        assert count_backups(repo) == before
        assert q.cmd("query-status")["status"] == "running"
        with GuestAgent(lab_vm.agent_socket, timeout=30.0) as ga:
            assert ga.fsfreeze_status() == "thawed"
    finally:
        q.cmd("block-job-cancel", {"device": "test-blocker", "force": True})
        deadline = time.monotonic() + 60
        while q.cmd("query-block-jobs") and time.monotonic() < deadline:
            time.sleep(0.05)
        q.cmd("blockdev-del", {"node-name": "test-null"})
        q.close()
    # The next backup (its inspect) commits the leftover overlay, then backs up.
    r = run(lab_vm, work, repo)
    assert r.committed and count_backups(repo) == before + 1
    assert_vm_clean(lab_vm, work)
    after_fault(lab_vm, work, repo, before + 1)


def test_refuses_a_guest_frozen_by_someone_else(lab_vm: LabVm, work: Path,
                                                repo: Repository) -> None:
    before = count_backups(repo)
    bms = set(bitmaps(lab_vm))
    with GuestAgent(lab_vm.agent_socket, timeout=30.0) as ga:
        assert ga.fsfreeze_freeze() >= 1
    try:
        with pytest.raises(HypervisorError, match="already frozen") as ei:
            run(lab_vm, work, repo)
        assert one_line(str(ei.value))
        with GuestAgent(lab_vm.agent_socket, timeout=30.0) as ga:
            assert ga.fsfreeze_status() == "frozen"  # not ours: left alone
        assert set(bitmaps(lab_vm)) == bms and count_backups(repo) == before
    finally:
        with GuestAgent(lab_vm.agent_socket, timeout=30.0) as ga:
            ga.fsfreeze_thaw()
    after_fault(lab_vm, work, repo, before)


def test_refuses_a_foreign_overlay(lab_vm: LabVm, work: Path, repo: Repository,
                                   tmp_path: Path) -> None:
    before = count_backups(repo)
    bms = set(bitmaps(lab_vm))
    ovl = tmp_path / "foreign.qcow2"
    q = control(lab_vm)  # the lab's control socket takes one client: no bitmaps() below
    try:
        q.cmd("blockdev-snapshot-sync", {"node-name": "lab-disk1", "snapshot-file": str(ovl),
                                         "snapshot-node-name": "foreign-ovl",
                                         "format": "qcow2"})
        with pytest.raises(HypervisorError, match="disk1 runs on an overlay") as ei:
            run(lab_vm, work, repo)
        assert one_line(str(ei.value))
        blocks = {b["device"] or b["qdev"]: b for b in q.cmd("query-block")
                  if b.get("inserted")}
        assert any(b["inserted"]["node-name"] == "foreign-ovl" for b in blocks.values())
        now = next(n for n in q.cmd("query-named-block-nodes", {"flat": True})
                   if n.get("node-name") == "lab-disk0")
        assert {b["name"] for b in now.get("dirty-bitmaps", [])} == bms
        assert count_backups(repo) == before
    finally:
        q.cmd("block-commit", {"job-id": "test-commit", "device": "foreign-ovl"})
        q.wait_event(lambda e: e.get("event") == "BLOCK_JOB_READY", 60)
        q.cmd("block-job-complete", {"device": "test-commit"})
        q.wait_event(lambda e: e.get("event") == "BLOCK_JOB_COMPLETED", 60)
        q.close()
        ovl.unlink(missing_ok=True)
    after_fault(lab_vm, work, repo, before)


# -- signals at each lifecycle step, to a real `snapferry backup` process --------------------


@pytest.fixture(scope="module")
def shared(lab_vm: LabVm, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Path, Repository]]:
    """One work dir + repository for all the signal cases (each case ends with a good
    backup, so the next starts from a clean VM and a valid parent)."""
    tmp = tmp_path_factory.mktemp("signals")
    with pytest.MonkeyPatch.context() as mp:
        work = vm_work_dir(lab_vm, tmp, mp)
        r = new_repo(tmp)
        run(lab_vm, work, r)
        yield work, r


@pytest.mark.parametrize("sig", ["sigint", "sigterm"])
@pytest.mark.parametrize("phase", PHASES)
def test_signal_at_each_step(lab_vm: LabVm, shared: tuple[Path, Repository], phase: str,
                             sig: str) -> None:
    work, repo = shared
    before = count_backups(repo)
    p = cli(["backup", lab_vm.uri, "--repo", str(repo.path), "--quiesce", "required",
             "--workers", "1"], env_extra={FAULT_ENV: faults.spec(**{f"after_{phase}": sig})})
    err = p.stderr.strip()
    print(f"{phase}:{sig} -> exit {p.returncode}: {err}")
    assert p.returncode == 130, (p.returncode, p.stdout, p.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("snapferry: interrupted"), err
    assert sig.upper() in err or "interrupted" in err
    after_fault(lab_vm, work, repo, before)


def test_failure_after_merge_keeps_every_write(lab_vm: LabVm, work: Path, repo: Repository,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An incremental fails after its overlay was merged (fault point ``after-merge``)
    while the guest wrote during the backup: no restore point, and the next incremental
    still holds that write (the round's bitmap was merged back into the parent's)."""
    before = count_backups(repo)
    during = {"/written-during-failed-backup.txt": payload("during", 30000)}

    def guest_writes() -> None:  # the guest is thawed and runs on the overlay here
        lab_write("/data0" + next(iter(during)), next(iter(during.values())),
                  lab_dir=lab_vm.lab_dir)

    monkeypatch.setenv(FAULT_ENV, faults.spec(after_merge="raise"))
    with pytest.raises(HypervisorError, match="test fault injected at after-merge"):
        run(lab_vm, work, repo, progress=HookProgress(on_start={"verify": guest_writes}))
    monkeypatch.delenv(FAULT_ENV)
    assert_vm_clean(lab_vm, work)
    assert count_backups(repo) == before
    r = run(lab_vm, work, repo, mode="incremental")
    assert r.backup.mode == "incremental"
    check_restore_point(repo, r.backup.backup_id, during, work.parent)
    after_fault(lab_vm, work, repo, before + 1)
