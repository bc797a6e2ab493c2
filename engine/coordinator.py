"""The backup coordinator: one VM through the lifecycle of DESIGN.md section 1.

request → quiesce → snapshot → thaw → copy → verify → merge → check on base → judge.

The coordinator owns the policy (quiesce required/preferred/off, retries, full vs
incremental) and the hard rule: whatever fails, ``Hypervisor.cleanup()`` runs in a
``finally`` with signals deferred, so the VM is left running, thawed, on its base
disks, with no overlay or export left behind; and no manifest is written unless every
step up to relock succeeded, so the repository only ever holds complete restore points.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal

from snapferry.engine import faults
from snapferry.engine.backup import BackupOptions, BackupResult, BackupSession
from snapferry.engine.errors import BackupAborted, HypervisorError, QuiesceError
from snapferry.engine.hypervisor import BackupMode, Hypervisor, ParentDisk
from snapferry.engine.planning import (
    SeriesRequest,
    chains,
    check_incremental,
    choose_parent,
    from_plans,
    parent_disks,
    review_disks,
    vm_identity,
)
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.store.manifest import Manifest
from snapferry.engine.store.repo import Repository

QuiescePolicy = Literal["required", "preferred", "off"]

@dataclass
class VmBackupOptions:
    mode: BackupMode = "auto"
    quiesce: QuiescePolicy = "preferred"
    retries: int = 1
    workers: int = 0
    verify: Literal["full", "quick"] = "quick"
    parent: str | None = None
    progress: Progress = field(default_factory=NullProgress)
    audit: float = 0.0  # CBT audit: percent of clean chunks re-read (the CLI's default: 1)
    name: str | None = None  # the restore-point series; default: the VM's name


@dataclass
class VmBackupResult:
    backup: BackupResult
    quiesced: bool
    consistency: str
    freeze_ms: float | None
    committed: bool
    verified: str
    attempts: int
    warnings: list[str]
    phase_seconds: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        out = self.backup.to_json()
        out.update(
            quiesced=self.quiesced,
            consistency=self.consistency,
            freeze_ms=self.freeze_ms,
            committed=self.committed,
            verified=self.verified,
            attempts=self.attempts,
            warnings=self.warnings,
            phase_seconds=self.phase_seconds,
        )
        return out


class _Interrupted(BackupAborted):
    pass


def _raise_on_signal(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    raise _Interrupted(f"interrupted by {name}: backup rolled back, VM left on its base disk")


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM raise ``BackupAborted`` inside the lifecycle (main thread only)."""
    try:
        old = {s: signal.signal(s, _raise_on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signal handling alone
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM while cleanup runs: cleanup must not be cut short."""
    pending: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    try:
        old = {s: signal.signal(s, remember) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield pending
        return
    try:
        yield pending
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def backup_vm(hv: Hypervisor, repo: Repository, options: VmBackupOptions) -> VmBackupResult:
    """Back up every disk of the VM behind ``hv`` into ``repo``; see the module doc."""
    progress = options.progress
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        progress.note(f"warning: {msg}")

    info = hv.inspect()
    identity = vm_identity(info.meta, info.name)
    series = options.name or info.name
    # refuses --mode incremental without a usable parent before the guest is frozen
    choice = choose_parent(repo, SeriesRequest(series, identity, options.mode,
                                               options.parent))
    for w in choice.warnings:
        warn(w)
    parent = choice.parent
    parents = parent_disks(parent)

    want_quiesce = options.quiesce != "off"
    quiesce_tries = max(0, options.retries) + 1
    attempts = 0
    last_quiesce_error: QuiesceError | None = None
    while True:
        attempts += 1
        try:
            return _one_attempt(
                hv, repo, options, series, parent, parents, want_quiesce, attempts, warn,
                warnings, identity,
            )
        except QuiesceError as e:
            last_quiesce_error = e
            if attempts < quiesce_tries:
                warn(f"quiesce failed ({e}); retrying ({attempts}/{quiesce_tries - 1})")
                time.sleep(min(2.0, 0.5 * attempts))
                continue
            if options.quiesce == "preferred" and want_quiesce:
                warn(f"quiesce failed ({e}); making a crash-consistent backup instead")
                want_quiesce = False
                continue
            raise QuiesceError(
                f"quiesce failed after {attempts} attempt(s): {last_quiesce_error}; "
                "nothing was backed up (use --quiesce preferred to fall back to crash-consistent)"
            ) from e


def _one_attempt(
    hv: Hypervisor,
    repo: Repository,
    options: VmBackupOptions,
    vm: str,
    parent: Manifest | None,
    parents: dict[str, ParentDisk],
    want_quiesce: bool,
    attempt: int,
    warn: Any,
    warnings: list[str],
    identity: str | None = None,
) -> VmBackupResult:
    progress = options.progress
    phases: dict[str, float] = {}
    session: BackupSession | None = None
    committed = False
    manifest_written = False
    quiesced = False
    frozen_count = 0
    freeze_ms: float | None = None
    consistency = "crash"
    primary: BaseException | None = None
    t_start = time.monotonic()

    def mark(phase: str, t0: float) -> None:
        phases[phase] = round(time.monotonic() - t0, 3)

    try:
        with _signals_raise():
            t_freeze = time.monotonic()
            if want_quiesce:
                progress.note("quiesce: freezing guest filesystems")
                frozen_count = hv.quiesce()
                quiesced = True
                faults.fire("after-quiesce")
            t0 = time.monotonic()
            hv.snapshot(options.mode, parents)
            mark("snapshot", t0)
            faults.fire("after-snapshot")
            if quiesced:
                thawed = hv.thaw()
                freeze_ms = round((time.monotonic() - t_freeze) * 1000.0, 1)
                if thawed != frozen_count:
                    raise QuiesceError(
                        f"thaw released {thawed} filesystem(s) but freeze held {frozen_count}: "
                        "the freeze did not hold"
                    )
                consistency = "filesystem"
                faults.fire("after-thaw")
            t0 = time.monotonic()
            plans = hv.export(options.mode, parents)
            mark("export", t0)
            faults.fire("after-export")
            disks, disk_warnings = review_disks(parent, from_plans(plans))
            check_incremental(options.mode, disks, parent)
            for w in disk_warnings:
                warn(w)
            chained = chains(parent, disks)
            session = BackupSession(
                repo,
                vm,
                BackupOptions(
                    workers=options.workers,
                    verify=options.verify,
                    parent=chained.backup_id if chained is not None else None,
                    progress=progress,
                    no_parent=chained is None,
                    audit=options.audit,
                    identity=identity,
                ),
            )
            t0 = time.monotonic()
            session.copy(disks)
            warnings.extend(session.warnings)  # already shown (the CBT audit)
            mark("copy", t0)
            faults.fire("after-copy")
            t0 = time.monotonic()
            session.verify()
            mark("verify", t0)
            faults.fire("after-verify")
            t0 = time.monotonic()
            progress.note("merge: handing the disks back to the VM")
            hv.merge_overlay()
            committed = True
            faults.fire("after-merge")
            hv.check_on_base()
            mark("commit", t0)
            result = session.commit(
                consistency=consistency,
                quiesced=quiesced,
                freeze_ms=freeze_ms,
                extra={"attempts": attempt, "phase_seconds": phases, "warnings": warnings},
            )
            manifest_written = True
            faults.fire("after-commit")
            phases["total"] = round(time.monotonic() - t_start, 3)
            return VmBackupResult(
                backup=result,
                quiesced=quiesced,
                consistency=consistency,
                freeze_ms=freeze_ms,
                committed=committed,
                verified=options.verify,
                attempts=attempt,
                warnings=list(warnings),
                phase_seconds=phases,
            )
    except KeyboardInterrupt as e:
        primary = BackupAborted("interrupted: backup rolled back, VM left running on its base disk")
        raise primary from e
    except BaseException as e:
        primary = e
        raise
    finally:
        with _signals_deferred() as pending:
            errors: list[str] = []
            if session is not None and not manifest_written:
                try:
                    session.abort()
                except Exception as e:  # keep cleaning up
                    errors.append(f"abort: {e}")
            try:
                hv.finalize(manifest_written)
            except Exception as e:
                errors.append(f"finalize: {e}")
            try:
                hv.cleanup()
            except Exception as e:
                errors.append(f"cleanup: {e}")
        if errors:
            detail = "; ".join(errors)
            if primary is None:
                raise HypervisorError(f"restore point written, but cleanup failed: {detail}")
            raise HypervisorError(f"{primary}; cleanup also failed: {detail}") from primary
        if pending and primary is None and manifest_written:
            raise BackupAborted(
                "interrupted after the restore point was written; VM left on its base disk"
            )
