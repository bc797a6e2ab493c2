"""The libvirt backend end to end on the lab guest as a real libvirt domain.

Nothing is mocked: libvirtd (started by scripts/libvirt-lab.sh), its QEMU (TCG), the
guest's qemu-ga behind libvirt's agent channel, libvirt's pull-mode backup with
checkpoints, the project's NBD client, the reader pool and a real repository. One
domain per session (``libvirtlab.lv_domain``): ``vda`` qcow2 with a write workload,
``vdb`` raw. Every test ends with the hard rule: domain running, thawed, no backup job,
no scratch file; every fault test then proves the next backup works.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from coordvm import CHUNK, SNAPFERRY, HookProgress, check_restore_point, flaky_opener, payload
from libvirtlab import (
    LvDomain,
    assert_domain_clean,
    backup_job_xml,
    checkpoints,
    lv_domain,
    restart_libvirtd,
)

from snapferry.engine.backup import merge_runs
from snapferry.engine.coordinator import VmBackupOptions, VmBackupResult, backup_vm
from snapferry.engine.errors import HypervisorError, QuiesceError, SnapferryError
from snapferry.engine.hypervisor import BackupMode, DiskPlan, ParentDisk
from snapferry.engine.libvirt.backend import CHECKPOINT_PREFIX, LibvirtHypervisor, SourceOpener
from snapferry.engine.libvirt.uri import parse_libvirt_uri
from snapferry.engine.progress import Progress
from snapferry.engine.store.repo import Repository
from snapferry.engine.targets import work_dir_for
from snapferry.lab.initramfs import FAIL_FREEZE_FLAG

AFFECT_LIVE = 1  # VIR_DOMAIN_AFFECT_LIVE

pytestmark = pytest.mark.vm
__all__ = ["lv_domain"]


class RecordingLv(LibvirtHypervisor):
    """The real backend; only remembers the plans ``export`` made."""

    plans: list[DiskPlan]

    def export(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> list[DiskPlan]:
        self.plans = super().export(mode, parents)
        return self.plans


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lv_domain: LvDomain) -> Path:
    monkeypatch.setenv("SNAPFERRY_WORK_DIR", str(tmp_path / "w"))
    return work_dir_for(parse_libvirt_uri(lv_domain.uri).key)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=CHUNK)


def make_hv(d: LvDomain, work: Path, opener: SourceOpener | None = None,
            progress: Progress | None = None) -> RecordingLv:
    return RecordingLv(parse_libvirt_uri(d.uri), work_dir=work, source_opener=opener,
                       progress=progress)


def run(d: LvDomain, work: Path, repo: Repository, *, mode: BackupMode = "auto",
        quiesce: str = "required", hv: RecordingLv | None = None,
        progress: Progress | None = None) -> VmBackupResult:
    h = hv or make_hv(d, work)
    opts = VmBackupOptions(mode=mode, quiesce=quiesce, retries=1, workers=2,
                           verify="full")
    if progress is not None:
        opts.progress = progress
    try:
        return backup_vm(h, repo, opts)
    finally:
        h.close()


def write_known(d: LvDomain, tag: str, count: int, size: int = 20 * 1024) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i in range(count):
        rel = f"/known-{tag}-{i}.txt"
        data = payload(f"{tag}-{i}", size)
        d.write_file("/data0" + rel, data, sync=(i == count - 1))
        files[rel] = data
    return files


def after_fault(d: LvDomain, work: Path, repo: Repository, before: int) -> VmBackupResult:
    assert_domain_clean(d, work)
    assert len(repo.list_backups()) == before, "a failed backup left a restore point"
    marker = write_known(d, f"after-fault-{before}-{time.monotonic_ns()}", 1, 4096)
    r = run(d, work, repo)
    assert r.quiesced and r.consistency == "filesystem" and r.committed
    assert len(repo.list_backups()) == before + 1
    check_restore_point(repo, r.backup.backup_id, marker, work, disk="vda")
    assert_domain_clean(d, work)
    return r


def ours(d: LvDomain) -> list[str]:
    return [c for c in checkpoints(d) if c.startswith(CHECKPOINT_PREFIX)]


def dirty_bytes(changed: list[tuple[int, int]], size: int) -> int:
    return sum(n for _f, n in merge_runs(changed, CHUNK, size)) * CHUNK


# -- done-when: full + two incrementals while the guest writes ---------------------------


def test_full_and_two_incrementals_while_the_guest_writes(
    lv_domain: LvDomain, work: Path, repo: Repository, tmp_path: Path
) -> None:
    d = lv_domain
    d.sh("[ -s /data0/filler.bin ] || dd if=/dev/urandom of=/data0/filler.bin bs=65536 "
         "count=64 2>/dev/null; sync", timeout=120)
    expected: dict[str, bytes] = {}
    rounds = []
    for n in range(3):
        expected.update(write_known(d, f"round{n}", 3))
        if n == 2:
            expected.update(write_known(d, "round0", 2, size=9000))  # rewrite two files
        hv = make_hv(d, work)
        t0 = time.monotonic()
        r = run(d, work, repo, hv=hv)
        took = time.monotonic() - t0
        print(f"libvirt backup {n}: {r.backup.mode}, {took:.2f} s, freeze {r.freeze_ms} ms, "
              f"read {r.backup.bytes_read} B, phases {r.phase_seconds}, warnings {r.warnings}")
        rounds.append((r, dict(expected), hv.plans))
        assert_domain_clean(d, work)
        assert len(ours(d)) == 1, ours(d)  # older checkpoints deleted after each commit

    full = rounds[0][0]
    allocated = {x.name: x.bytes_read for x in full.backup.disks}
    assert allocated["vda"] > 4 * 1024 * 1024
    prev: str | None = None
    for n, (r, files, plans) in enumerate(rounds):
        m = repo.load_manifest(r.backup.backup_id)
        assert m.mode == ("full" if n == 0 else "incremental")
        assert m.parent == prev
        assert m.consistency == "filesystem" and m.quiesced is True
        assert m.freeze_ms is not None and m.freeze_ms > 0
        assert r.committed and r.attempts == 1
        by_disk = {e.name: e for e in m.disks}
        cp = by_disk["vda"].tracking["checkpoint"]
        assert isinstance(cp, str) and cp.startswith(CHECKPOINT_PREFIX)
        assert by_disk["vdb"].tracking["checkpoint"] is None  # raw: no checkpoint
        if n > 0:
            plan = {p.name: p for p in plans}
            assert plan["vdb"].changed is None and "raw" in str(plan["vdb"].full_reason)
            changed = plan["vda"].changed
            assert changed is not None, "incremental of vda without dirty ranges"
            vda = next(x for x in r.backup.disks if x.name == "vda")
            dirty = sum(n for _o, n in changed)
            print(f"incremental {n}: vda dirty ranges {dirty} B in {len(changed)} runs, "
                  f"dirty chunks {dirty_bytes(changed, vda.virtual_size)} B, "
                  f"read {vda.bytes_read} B")
            assert 0 < vda.bytes_read <= dirty_bytes(changed, vda.virtual_size)
            assert vda.bytes_read <= allocated["vda"] // 4, (vda.bytes_read, allocated)
            # the raw disk's note is said once per run, not per attempt or per disk
            assert sum("raw" in w for w in r.warnings) == 1, r.warnings
        prev = r.backup.backup_id
        check_restore_point(repo, r.backup.backup_id, files, tmp_path, disk="vda")
        check_restore_point(repo, r.backup.backup_id, {}, tmp_path, disk="vdb")
    last = repo.load_manifest(rounds[-1][0].backup.backup_id)
    assert ours(d) == [next(e for e in last.disks if e.name == "vda").tracking["checkpoint"]]


# -- faults ------------------------------------------------------------------------------


def test_agent_missing(lv_domain: LvDomain, work: Path, repo: Repository) -> None:
    """The guest-agent channel is unplugged from the running domain: 'required' refuses
    with nothing backed up, 'preferred' falls back to a crash-consistent backup. The guest
    is restarted afterwards (its qemu-ga does not survive losing its port)."""
    d = lv_domain
    before = len(repo.list_backups())
    d.dom().detachDeviceFlags(d.channel_xml(), AFFECT_LIVE)
    try:
        with pytest.raises(QuiesceError, match="agent"):
            run(d, work, repo, quiesce="required")
        assert len(repo.list_backups()) == before
        assert backup_job_xml(d) is None
        r = run(d, work, repo, quiesce="preferred")
        assert r.consistency == "crash" and not r.quiesced and r.committed
        assert any("crash-consistent" in w for w in r.warnings), r.warnings
        assert backup_job_xml(d) is None
    finally:
        d.dom().attachDeviceFlags(d.channel_xml(), AFFECT_LIVE)
        d.dom().destroy()
        d.start()
    after_fault(d, work, repo, before + 1)


def test_freeze_fails_in_the_guest(lv_domain: LvDomain, work: Path, repo: Repository) -> None:
    """The guest's fsfreeze hook exits non-zero: the freeze fails through libvirt."""
    d = lv_domain
    before = len(repo.list_backups())
    d.write_file(FAIL_FREEZE_FLAG, b"1\n", sync=False)
    try:
        with pytest.raises(QuiesceError, match="freeze"):
            run(d, work, repo, quiesce="required")
        assert_domain_clean(d, work)
        r = run(d, work, repo, quiesce="preferred")
        assert r.consistency == "crash"
    finally:
        d.write_file(FAIL_FREEZE_FLAG, b"0\n", sync=False)
    after_fault(d, work, repo, before + 1)


def test_nbd_read_fails_mid_copy(lv_domain: LvDomain, work: Path, repo: Repository) -> None:
    d = lv_domain
    run(d, work, repo)
    before = len(repo.list_backups())
    cps = ours(d)
    hv = make_hv(d, work, opener=flaky_opener(fail_after=2))
    with pytest.raises(SnapferryError, match="test fault"):
        run(d, work, repo, mode="full", hv=hv)
    assert ours(d) == cps, "the failed run's checkpoint was not dropped"
    r = after_fault(d, work, repo, before)
    assert r.backup.mode == "incremental"  # the old checkpoint still chains


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from coordvm import HookProgress
from snapferry.engine.coordinator import VmBackupOptions, backup_vm
from snapferry.engine.libvirt.backend import LibvirtHypervisor
from snapferry.engine.libvirt.uri import parse_libvirt_uri
from snapferry.engine.store.repo import Repository

def die():
    os.killpg(os.getpgid(0), signal.SIGKILL)  # this process and its reader workers

hv = LibvirtHypervisor(parse_libvirt_uri({uri!r}), work_dir={work!r})
backup_vm(hv, Repository.open({repo!r}), VmBackupOptions(
    quiesce="required", workers=2, progress=HookProgress(on_first_advance=die)))
"""


def test_snapferry_killed_mid_copy_then_next_run(
    lv_domain: LvDomain, work: Path, repo: Repository, tmp_path: Path
) -> None:
    """SIGKILL of the backup process (and its workers) at its first copied bytes: the
    job, the freeze state and the unbacked checkpoint are cleared by the next run, which
    then chains correctly."""
    d = lv_domain
    run(d, work, repo)
    before = len(repo.list_backups())
    cps = ours(d)
    script = KILLER.format(tests=str(Path(__file__).parent), uri=d.uri, work=str(work),
                           repo=str(repo.path))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, start_new_session=True)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    assert backup_job_xml(d) is not None  # left behind by the kill, as a crash would
    assert len(ours(d)) == 2  # the parent's and the dead run's
    assert len(repo.list_backups()) == before
    progress = HookProgress()
    notes: list[str] = []
    progress.note = notes.append
    r = run(d, work, repo, progress=progress, hv=make_hv(d, work, progress=progress))
    assert any("interrupted snapferry run" in n for n in notes), notes
    assert r.backup.mode == "incremental"
    assert len(ours(d)) == 1 and ours(d) != cps
    assert_domain_clean(d, work)
    after_fault(d, work, repo, before + 1)


def test_checkpoint_bitmap_broken_behind_our_back(lv_domain: LvDomain, work: Path,
                                                  repo: Repository) -> None:
    """libvirt still lists the checkpoint but its bitmap is gone from the qcow2 node: the
    incremental cannot begin, the disk is backed up in full with one warning."""
    import libvirt_qemu

    d = lv_domain
    run(d, work, repo)
    (cp,) = ours(d)

    def qmp(cmd: str, args: dict[str, object] | None = None) -> object:
        msg = {"execute": cmd, **({"arguments": args} if args else {})}
        return json.loads(libvirt_qemu.qemuMonitorCommand(d.dom(), json.dumps(msg), 0))["return"]

    nodes = qmp("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    node = next(n["node-name"] for n in nodes
                if any(b.get("name") == cp for b in n.get("dirty-bitmaps", [])))
    qmp("block-dirty-bitmap-remove", {"node": node, "name": cp})
    r = run(d, work, repo)
    assert r.backup.mode == "full"
    assert sum("broken" in w for w in r.warnings) == 1, r.warnings
    assert_domain_clean(d, work)
    assert len(ours(d)) == 1 and ours(d) != [cp]
    r2 = run(d, work, repo)
    assert r2.backup.mode == "incremental"


def test_libvirtd_restarted_mid_backup(lv_domain: LvDomain, work: Path,
                                       repo: Repository) -> None:
    """libvirtd stops and comes back while the disks are being read: the backup either
    completes or fails cleanly; either way the domain ends with no job and the next
    backup works."""
    d = lv_domain
    run(d, work, repo)
    before = len(repo.list_backups())
    progress = HookProgress(on_first_advance=restart_libvirtd)
    outcome: str
    try:
        r = run(d, work, repo, mode="full", progress=progress)
        outcome = f"completed ({r.backup.mode})"
        before += 1
    except SnapferryError as e:
        outcome = f"failed cleanly: {e}"
    print("libvirtd restart mid-backup:", outcome)
    assert "advance" in progress.fired
    after_fault(d, work, repo, before)


def test_checkpoint_deleted_behind_our_back(lv_domain: LvDomain, work: Path,
                                            repo: Repository) -> None:
    d = lv_domain
    run(d, work, repo)
    for name in ours(d):
        d.dom().checkpointLookupByName(name, 0).delete(0)
    hv = make_hv(d, work)
    r = run(d, work, repo, hv=hv)
    assert r.backup.mode == "full"
    gone = [w for w in r.warnings if "is gone" in w]
    assert len(gone) == 1, r.warnings
    assert_domain_clean(d, work)
    r2 = run(d, work, repo)
    assert r2.backup.mode == "incremental"


def test_refuses_a_foreign_backup_job(lv_domain: LvDomain, work: Path, repo: Repository,
                                      tmp_path: Path) -> None:
    d = lv_domain
    before = len(repo.list_backups())
    sock = tmp_path / "other.sock"
    xml = (f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
           f"<disk name='vda' backup='yes' type='file'><scratch file='{tmp_path}/o.scratch'/>"
           "</disk><disk name='vdb' backup='no'/></disks></domainbackup>")
    d.dom().backupBegin(xml, None, 0)
    try:
        with pytest.raises(HypervisorError, match="did not start"):
            run(d, work, repo)
        assert backup_job_xml(d) is not None, "snapferry touched someone else's job"
        assert d.freeze_status() == "thawed"
    finally:
        d.dom().abortJob()
        _wait(lambda: backup_job_xml(d) is None, 60, "the foreign job to end")
    assert len(repo.list_backups()) == before
    after_fault(d, work, repo, before)


def test_shut_off_domain_is_read_directly(lv_domain: LvDomain, work: Path, repo: Repository,
                                          tmp_path: Path) -> None:
    d = lv_domain
    files = write_known(d, "offline", 2)
    d.shutdown()
    try:
        notes: list[str] = []
        progress = HookProgress()
        progress.note = notes.append
        r = run(d, work, repo, progress=progress, hv=make_hv(d, work, progress=progress))
        assert r.backup.mode == "full"
        assert any("shut off" in n for n in notes), notes
        assert r.consistency == "filesystem" and r.freeze_ms is not None
        check_restore_point(repo, r.backup.backup_id, files, tmp_path, disk="vda")
        assert not list(work.glob("*.sock"))
    finally:
        d.start()
    assert_domain_clean(d, work)


def test_cli_json(lv_domain: LvDomain, work: Path, repo: Repository) -> None:
    d = lv_domain
    env = dict(os.environ)
    out = subprocess.run([str(SNAPFERRY), "backup", d.uri, "--repo", str(repo.path), "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    for key in ("quiesced", "consistency", "freeze_ms", "committed", "attempts", "warnings"):
        assert key in j
    assert j["consistency"] == "filesystem"
    bad = subprocess.run([str(SNAPFERRY), "backup", "libvirt:///system/no-such-domain-x",
                          "--repo", str(repo.path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapferry: "), bad.stderr
    assert "no-such-domain-x" in lines[0]
    assert_domain_clean(d, work)


@pytest.mark.parametrize("point", ["after_quiesce", "after_export"])
def test_cleanup_after_a_killed_cli_backup(lv_domain: LvDomain, work: Path, repo: Repository,
                                           point: str) -> None:
    """``snapferry cleanup DOMAIN`` (it was QEMU-only): a CLI backup SIGKILLed with the
    guest frozen, or with its backup job and new checkpoint in place; cleanup thaws,
    ends the job, deletes the unbacked checkpoint, removes the scratch files, says each;
    a second cleanup finds nothing; the next backup is incremental."""
    from snapferry.engine import faults
    from snapferry.engine.faults import FAULT_ENV

    d = lv_domain
    run(d, work, repo)
    before = len(repo.list_backups())
    cps = ours(d)
    env = {**os.environ, FAULT_ENV: faults.spec(**{point: "sigkill"})}
    p = subprocess.run([str(SNAPFERRY), "backup", d.uri, "--repo", str(repo.path),
                        "--quiesce", "required", "--workers", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    if point == "after_quiesce":
        assert d.freeze_status() == "frozen"
    else:
        assert backup_job_xml(d) is not None and len(ours(d)) == len(cps) + 1
    c = subprocess.run([str(SNAPFERRY), "cleanup", d.uri, "--json"], capture_output=True,
                       text=True, env=dict(os.environ), timeout=300)
    assert c.returncode == 0, c.stderr
    actions = " / ".join(json.loads(c.stdout)["actions"])
    if point == "after_quiesce":
        assert "thawed" in actions, actions
    else:
        assert "ended the backup job" in actions and "deleted checkpoint" in actions, actions
    assert_domain_clean(d, work)
    assert ours(d) == cps
    again = subprocess.run([str(SNAPFERRY), "cleanup", d.uri, "--json"], capture_output=True,
                           text=True, env=dict(os.environ), timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["actions"] == [], again.stdout
    r = after_fault(d, work, repo, before)
    assert r.backup.mode == "incremental"


def test_kill_after_commit_next_backup_incremental(lv_domain: LvDomain, work: Path,
                                                   repo: Repository) -> None:
    """Issue 15 item 11 on libvirt: SIGKILL after the restore point was committed, before
    finalize: the next backup chains to it incrementally (its checkpoint was deleted as
    "never backed by a restore point", so the next backup was full)."""
    from snapferry.engine import faults
    from snapferry.engine.faults import FAULT_ENV

    d = lv_domain
    run(d, work, repo)
    before = len(repo.list_backups())
    env = {**os.environ, FAULT_ENV: faults.spec(after_commit="sigkill")}
    p = subprocess.run([str(SNAPFERRY), "backup", d.uri, "--repo", str(repo.path),
                        "--quiesce", "required", "--workers", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert len(repo.list_backups()) == before + 1
    killed = max(repo.list_backups(), key=lambda m: m.backup_id)
    marker = write_known(d, "after-commit-kill", 1, 4096)
    r = run(d, work, repo)
    assert r.backup.parent == killed.backup_id
    assert r.backup.mode == "incremental", r.backup.disks
    vda = next(x for x in r.backup.disks if x.name == "vda")
    assert vda.full_reason is None
    check_restore_point(repo, r.backup.backup_id, marker, work, disk="vda")
    assert len(ours(d)) == 1  # the parent's and the killed run's old ones are gone
    assert_domain_clean(d, work)


@pytest.fixture(autouse=True)
def _leave_domain_clean(lv_domain: LvDomain) -> Iterator[None]:
    yield
    if backup_job_xml(lv_domain) is not None:
        lv_domain.dom().abortJob()
