"""``snapferry demo``: the product's main job, end to end, on the lab VM.

lab up → known files written in the guest → full backup while the guest's workload
writes → more guest writes → incremental backup (only dirty chunks read) → restore both
restore points → each one's ext4 is clean (``e2fsck -fn``) and holds every file written
before its freeze with the right content → lab down.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapferry.engine.coordinator import VmBackupOptions, VmBackupResult, backup_vm
from snapferry.engine.errors import SnapferryError
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.restore import restore
from snapferry.engine.store.repo import Repository
from snapferry.engine.targets import TargetOptions, open_hypervisor
from snapferry.engine.units import human_bytes
from snapferry.lab.check import fsck_clean, read_file
from snapferry.lab.vm import LabVm, lab_down, lab_target, lab_up, lab_write

GUEST_MOUNT = "/data0"


class DemoFailed(SnapferryError):
    """A demo check failed: the backup or restore did not hold what it should."""


@dataclass
class DemoStep:
    label: str
    backup_id: str
    mode: str
    consistency: str
    freeze_ms: float | None
    seconds: float
    bytes_read: int
    bytes_stored: int
    virtual_size: int
    files_checked: int
    fsck_clean: bool
    restore_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DemoReport:
    accel: str
    boot_seconds: float
    steps: list[DemoStep] = field(default_factory=list)
    repo: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "accel": self.accel,
            "boot_seconds": self.boot_seconds,
            "repo": self.repo,
            "seconds": self.seconds,
            "steps": [s.to_json() for s in self.steps],
        }

    def summary(self) -> str:
        lines = [
            f"lab VM booted under {self.accel.upper()} in {self.boot_seconds:.1f} s",
        ]
        for s in self.steps:
            lines.append(
                f"{s.label:<12} {s.mode:<11} {s.consistency:<10} "
                f"freeze {s.freeze_ms or 0:6.0f} ms  backup {s.seconds:5.1f} s  "
                f"read {human_bytes(s.bytes_read):>10} of {human_bytes(s.virtual_size)}  "
                f"stored {human_bytes(s.bytes_stored):>10}  restore {s.restore_seconds:4.1f} s  "
                f"{s.files_checked} files ok, fsck {'clean' if s.fsck_clean else 'DIRTY'}"
            )
        lines.append(f"demo passed in {self.seconds:.0f} s (repository: {self.repo})")
        return "\n".join(lines)


def _payload(tag: str, i: int, size: int) -> bytes:
    seed = hashlib.sha256(f"{tag}-{i}".encode()).digest()
    out = bytearray()
    while len(out) < size:
        out += f"{tag} file {i} block {len(out)} {seed.hex()}\n".encode()
    return bytes(out[:size])


def _write_files(tag: str, count: int, size: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i in range(count):
        rel = f"/demo-{tag}-{i:03d}.txt"
        data = _payload(tag, i, size)
        lab_write(GUEST_MOUNT + rel, data, sync=(i == count - 1))
        files[rel] = data
    return files


def _check_restore(
    repo: Repository, result: VmBackupResult, expected: dict[str, bytes], scratch: Path
) -> tuple[int, bool, float]:
    disk = result.backup.disks[0].name
    out = scratch / f"{result.backup.backup_id}-{disk}.raw"
    t0 = time.monotonic()
    restore(repo, result.backup.backup_id, to=out, disk=disk, fmt="raw")
    restore_s = time.monotonic() - t0
    clean, report = fsck_clean(out)
    if not clean:
        last = report.splitlines()[-1] if report else "no output"
        raise DemoFailed(
            f"restore point {result.backup.backup_id}: e2fsck found problems: {last}"
        )
    for path, data in expected.items():
        got = read_file(out, path)
        if got != data:
            raise DemoFailed(
                f"restore point {result.backup.backup_id}: {path} differs "
                f"({len(got)} bytes restored, {len(data)} expected)"
            )
    out.unlink()
    return len(expected), clean, restore_s


def run_demo(
    *,
    repo_path: Path | None = None,
    keep_lab: bool = False,
    progress: Progress | None = None,
    say: Callable[[str], None] = lambda s: None,
) -> DemoReport:
    prog = progress or NullProgress()
    t_start = time.monotonic()
    say("lab: building (cached) and booting the lab VM ...")
    vm: LabVm = lab_up()
    report = DemoReport(accel=vm.accel, boot_seconds=vm.boot_seconds)
    scratch = Path(tempfile.mkdtemp(prefix="snapferry-demo-"))
    try:
        rpath = repo_path or (vm.lab_dir / "demo-repo")
        if rpath.exists():
            shutil.rmtree(rpath)
        repo = Repository.init(rpath)
        report.repo = str(rpath)

        def one_backup(label: str) -> VmBackupResult:
            uri, work = lab_target(vm.lab_dir)
            hv = open_hypervisor(uri, TargetOptions(progress=prog, work_dir=work))
            try:
                return backup_vm(
                    hv, repo, VmBackupOptions(mode="auto", quiesce="required", progress=prog)
                )
            finally:
                hv.close()

        expected: dict[str, bytes] = {}
        say("guest: writing 20 known files while its workload keeps writing ...")
        expected.update(_write_files("before-full", 20, 48 * 1024))
        say("backup 1: full, live, quiesced ...")
        r1 = one_backup("full")
        files1 = dict(expected)
        say("guest: writing 10 more files and rewriting 5 ...")
        expected.update(_write_files("before-incr", 10, 48 * 1024))
        expected.update(_write_files("before-full", 5, 40 * 1024))
        say("backup 2: incremental (dirty bitmap) ...")
        r2 = one_backup("incremental")
        files2 = dict(expected)
        for label, r, files in (("backup 1", r1, files1), ("backup 2", r2, files2)):
            say(f"{label}: restoring {r.backup.backup_id} and checking it ...")
            n, clean, rs = _check_restore(repo, r, files, scratch)
            d = r.backup.disks[0]
            report.steps.append(
                DemoStep(
                    label=label,
                    backup_id=r.backup.backup_id,
                    mode=r.backup.mode,
                    consistency=r.consistency,
                    freeze_ms=r.freeze_ms,
                    seconds=r.backup.seconds,
                    bytes_read=d.bytes_read,
                    bytes_stored=d.bytes_stored,
                    virtual_size=d.virtual_size,
                    files_checked=n,
                    fsck_clean=clean,
                    restore_seconds=round(rs, 2),
                )
            )
        if r2.backup.mode != "incremental":
            raise DemoFailed(f"the second backup was {r2.backup.mode}, expected incremental")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not keep_lab:
            say("lab: shutting down")
            lab_down()
    report.seconds = round(time.monotonic() - t_start, 1)
    return report
