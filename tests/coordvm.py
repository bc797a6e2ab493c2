"""Helpers shared by the coordinator's end-to-end tests (test_coordinator_*, test_cli_vm).

Everything here drives the REAL lab VM (``labvm.lab_vm``: QEMU under TCG, qemu-ga in
the guest), the real QEMU backend, the real reader pool and a real repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from labvm import assert_vm_clean

from snapferry.engine.coordinator import VmBackupOptions, VmBackupResult, backup_vm
from snapferry.engine.errors import SourceError
from snapferry.engine.hypervisor import BackupMode, DiskPlan, ParentDisk
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.qemu.agent import AgentError, GuestAgent
from snapferry.engine.qemu.backend import QemuHypervisor, SourceOpener, default_source_opener
from snapferry.engine.restore import restore
from snapferry.engine.source import DiskSource, Extent, SourceSpec
from snapferry.engine.store.repo import Repository
from snapferry.engine.targets import work_dir_for
from snapferry.lab import check as labcheck
from snapferry.lab.vm import LabVm, lab_write

ROOT = Path(__file__).resolve().parent.parent
SNAPFERRY = ROOT / ".venv" / "bin" / "snapferry"
CHUNK = 64 * 1024  # small chunks: the incremental read bound is tight on a 32 MiB disk


def vm_work_dir(vm: LabVm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``SNAPFERRY_WORK_DIR`` at the test's tmp dir; the backend's work dir for the
    lab VM (the same the CLI computes for ``vm.uri``)."""
    monkeypatch.setenv("SNAPFERRY_WORK_DIR", str(tmp_path / "sfwork"))
    return work_dir_for(vm.qmp_socket)


def vm_name(vm: LabVm) -> str:
    """The name ``open_hypervisor(vm.uri)`` files restore points under."""
    return Path(vm.qmp_socket).parent.name


class RecordingHv(QemuHypervisor):
    """The real backend; only remembers the plans ``export`` made (to know the dirty
    ranges the bitmap reported) — no behaviour is changed."""

    plans: list[DiskPlan]

    def export(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> list[DiskPlan]:
        self.plans = super().export(mode, parents)
        return self.plans


def make_hv(vm: LabVm, work: Path, *, agent_socket: str | None = None,
            agent_timeout: float = 10.0, source_opener: SourceOpener | None = None
            ) -> RecordingHv:
    return RecordingHv(vm.qmp_socket, agent_socket or vm.agent_socket, work_dir=work,
                       name=vm_name(vm), agent_timeout=agent_timeout,
                       source_opener=source_opener)


def new_repo(tmp_path: Path, name: str = "repo") -> Repository:
    return Repository.init(tmp_path / name, chunk_size=CHUNK)


def run(vm: LabVm, work: Path, repo: Repository, *, mode: BackupMode = "auto",
        quiesce: Any = "required", retries: int = 1, workers: int = 2,
        hv: RecordingHv | None = None, progress: Progress | None = None) -> VmBackupResult:
    """One backup through the coordinator with the real backend."""
    h = hv or make_hv(vm, work)
    try:
        opts = VmBackupOptions(mode=mode, quiesce=quiesce, retries=retries, workers=workers,
                               verify="full")
        if progress is not None:
            opts.progress = progress
        return backup_vm(h, repo, opts)
    finally:
        h.close()


def payload(tag: str, size: int) -> bytes:
    seed = hashlib.sha256(tag.encode()).hexdigest()
    out = bytearray()
    while len(out) < size:
        out += f"{tag} {len(out)} {seed}\n".encode()
    return bytes(out[:size])


def write_known(vm: LabVm, tag: str, count: int, size: int = 20 * 1024) -> dict[str, bytes]:
    """Write ``count`` files under /data0 in the guest (synced); {path in fs: bytes}."""
    files: dict[str, bytes] = {}
    for i in range(count):
        rel = f"/known-{tag}-{i}.txt"
        data = payload(f"{tag}-{i}", size)
        lab_write("/data0" + rel, data, lab_dir=vm.lab_dir, sync=(i == count - 1))
        files[rel] = data
    return files


def check_restore_point(repo: Repository, backup_id: str, expected: dict[str, bytes],
                        scratch: Path, disk: str = "disk0") -> None:
    """Restore ``disk`` of ``backup_id``: its ext4 is clean and holds ``expected``."""
    out = scratch / f"{backup_id}-{disk}.raw"
    restore(repo, backup_id, to=out, disk=disk, fmt="raw")
    try:
        ok, report = labcheck.fsck_clean(out)
        assert ok, f"{backup_id}/{disk}: e2fsck: {report}"
        for path, data in expected.items():
            assert labcheck.read_file(out, path) == data, f"{backup_id}: {path} differs"
    finally:
        out.unlink(missing_ok=True)


def count_backups(repo: Repository) -> int:
    return len(repo.list_backups())


def after_fault(vm: LabVm, work: Path, repo: Repository, before: int) -> VmBackupResult:
    """The checks every fault test ends with: the VM is clean, the failed backup left no
    restore point, and the next backup succeeds (and is complete and restorable)."""
    assert_vm_clean(vm, work, unlocked=True)
    assert count_backups(repo) == before, "a failed backup left a restore point"
    marker = write_known(vm, f"after-fault-{os.getpid()}-{before}", 1, 4096)
    r = run(vm, work, repo)
    assert r.quiesced and r.consistency == "filesystem" and r.committed
    assert count_backups(repo) == before + 1
    check_restore_point(repo, r.backup.backup_id, marker, work)
    assert_vm_clean(vm, work)
    return r


def cli(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 300.0
        ) -> subprocess.CompletedProcess[str]:
    """Run the real ``snapferry`` CLI in a subprocess (the environment of this test:
    SNAPFERRY_WORK_DIR included)."""
    exe = [str(SNAPFERRY)] if SNAPFERRY.exists() else [sys.executable, "-m", "snapferry"]
    env = dict(os.environ)
    env.pop("SNAPFERRY_DEBUG", None)
    env.update(env_extra or {})
    return subprocess.run(exe + args, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


# -- a reader that fails mid-copy (fault injection at the DiskSource seam) ---------------


class FlakySource:
    """Wraps a real ``DiskSource`` (the project's NBD client on QEMU's real export); its
    ``readinto`` raises ``SourceError`` after ``fail_after`` successful reads in this
    process. Mock boundary: only the failure is made up; everything read before it is
    real. Picklable through ``FlakySpec``, so every reader worker gets one."""

    def __init__(self, inner: DiskSource, fail_after: int) -> None:
        self.inner = inner
        self.fail_after = fail_after
        self.reads = 0

    @property
    def size(self) -> int:
        return self.inner.size

    def extents(self, offset: int = 0, length: int | None = None, *,
                dirty: bool = False) -> Iterator[Extent]:
        return self.inner.extents(offset, length, dirty=dirty)

    def readinto(self, buf: memoryview, offset: int) -> None:
        if self.reads >= self.fail_after:
            raise SourceError(f"test fault: read at offset {offset} failed after "
                              f"{self.reads} reads")
        self.inner.readinto(buf, offset)
        self.reads += 1

    def spec(self) -> FlakySpec:
        return FlakySpec(self.inner.spec(), self.fail_after)

    def clone(self) -> FlakySource:
        return self.spec().open()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class FlakySpec:
    inner: SourceSpec
    fail_after: int

    def open(self) -> FlakySource:
        return FlakySource(self.inner.open(), self.fail_after)


def flaky_opener(fail_after: int) -> SourceOpener:
    def opener(uri: str, bitmap: str | None) -> DiskSource:
        return FlakySource(default_source_opener(uri, bitmap), fail_after)
    return opener


class HookProgress(NullProgress):
    """A ``Progress`` that runs test callbacks at phase starts / the first advance: the
    engine's own progress calls are the seam used to act at a precise lifecycle point
    (between copy and verify, mid-copy) without touching the engine."""

    def __init__(self, on_start: dict[str, Callable[[], None]] | None = None,
                 on_first_advance: Callable[[], None] | None = None) -> None:
        self.on_start = on_start or {}
        self.on_first_advance = on_first_advance
        self.fired: list[str] = []

    def start(self, label: str, total_bytes: int) -> None:
        for prefix, fn in self.on_start.items():
            if label.startswith(prefix) and prefix not in self.fired:
                self.fired.append(prefix)
                fn()

    def advance(self, nbytes: int) -> None:
        if self.on_first_advance is not None and "advance" not in self.fired:
            self.fired.append("advance")
            self.on_first_advance()


@contextlib.contextmanager
def guest_ticker(vm: LabVm, log: str = "/data0/tick.log") -> Iterator[list[float]]:
    """A guest loop appending /proc/uptime to ``log`` every ~50 ms: a write blocked by the
    freeze (or slowed by copy-before-write) shows as a gap. Yields a list filled, on exit,
    with the guest's tick times (s). Measurement only (reported, never asserted on)."""
    ticks: list[float] = []
    script = (f"rm -f {log}; while :; do read up idle < /proc/uptime; "
              f"echo $up >> {log}; sleep 0.05; done")
    pid: int | None = None
    try:
        with GuestAgent(vm.agent_socket, timeout=30.0) as ga:
            pid = int(ga.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", script]})["pid"])
    except AgentError:
        pid = None
    try:
        yield ticks
    finally:
        if pid is not None:
            with GuestAgent(vm.agent_socket, timeout=30.0) as ga:
                ga.exec_wait("/bin/kill", [str(pid)], timeout=30.0)
                with contextlib.suppress(AgentError):
                    ticks += [float(x) for x in ga.file_read(log).split()]


def max_gap_ms(ticks: list[float]) -> float:
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    return max(gaps) * 1000 if gaps else float("nan")
