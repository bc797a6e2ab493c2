"""One restore point: copy → verify → commit (or abort), driving the reader pool.

``BackupSession`` is what the coordinator (VM backups) and the CLI (files, NBD exports)
call. It holds the repository lock from construction until ``commit`` or ``abort``.

* copy: for each disk, the chunk runs to read — all allocated, non-zero extents for a
  full copy (``DiskInput.changed is None``), or the changed byte ranges rounded out to
  chunks, the rest of the index copied from the parent restore point — go to the
  reader pool; the parent process only assembles the index (numpy) and the counts.
* verify: every pack this backup wrote exists (``verify="quick"``, the default); with
  ``verify="full"`` each is also read back and every blob in it decoded and re-hashed
  (by the worker that wrote it, right after the save).
* commit: ``Repository.commit_restore_point`` (changed index pages, their pack and index
  file, the collision check against concurrent writers, manifest last).
* abort: workers killed, the packs and index files this backup saved removed, its temp
  files removed, lock released; no manifest. Idempotent.

The backup holds the repository's *shared* role: other backups may run at once (each
writes only new, uniquely named objects); only deleters need the exclusive role.

Planning comes first, then at most one worker per work item is started. Sources with a
``max_connections`` attribute (NBD, VDDK) bound the worker count. The caller's
connections stay open for the whole backup (``qemu-nbd`` without ``-t`` exits when its
last client leaves); a source with ``spare_connections`` (NBD) says how many more
clients its server takes, and when that is none the copy runs in this process through
the caller's connection (``engine/inline_reader.py``), which the backup says in one
warning line. A small incremental (every disk tracked, at most
``BackupOptions.inline_max_bytes`` to read, the worker count left automatic) also runs
in this process: spawning workers (an interpreter and its imports each) costs more than
reading a few hundred MiB.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from snapferry.engine.errors import BackupAborted, RepositoryError, SnapferryError, UsageError
from snapferry.engine.inline_reader import InlineReader
from snapferry.engine.planning import (
    AuditPlan,
    SeriesRequest,
    allocated_mask,
    choose_parent,
    full_read_runs,
    mask_runs,
    plan_audit,
    plan_full,
    plan_incremental,
    run_bytes,
    runs_mask,
)
from snapferry.engine.planning import (
    DiskInput as DiskInput,
)
from snapferry.engine.planning import (
    allocated_ranges as allocated_ranges,
)
from snapferry.engine.planning import (
    merge_runs as merge_runs,
)
from snapferry.engine.pool import (
    BatchResult,
    Copy,
    Flush,
    PoolConfig,
    ReaderPool,
    Request,
    Run,
    VerifyPacks,
    make_items,
)
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.store.blobs import TYPE_PAGE
from snapferry.engine.store.chunks import ChunkReader
from snapferry.engine.store.index import DiskIndex
from snapferry.engine.store.manifest import DiskEntry, Manifest
from snapferry.engine.store.pack import WrittenObjects
from snapferry.engine.store.repo import Repository

VerifyLevel = Literal["full", "quick"]
INTERRUPTED = "interrupted: backup rolled back, no restore point written"


INLINE_MAX_BYTES = 256 << 20


@dataclass
class BackupOptions:
    workers: int = 0  # 0: one per CPU
    verify: VerifyLevel = "quick"
    parent: str | None = None  # explicit parent id; None: latest restore point of the vm
    progress: Progress = field(default_factory=NullProgress)
    no_parent: bool = False  # True: a full backup with no parent whatever exists
    item_bytes: int = 8 << 20  # bytes per work item handed to a worker
    # an incremental reading at most this much (and ``workers`` automatic) runs in this
    # process instead of spawning workers; 0: never
    inline_max_bytes: int = INLINE_MAX_BYTES
    audit: float = 0.0  # percent of clean chunks of incremental disks to re-read (CBT audit)
    audit_seed: int | None = None  # seed of the audit's sample (None: random)
    identity: str | None = None  # the source's identity, recorded in the manifest


@dataclass
class DiskResult:
    name: str
    virtual_size: int
    bytes_read: int
    bytes_stored: int
    chunks_new: int
    chunks_reused: int
    full_reason: str | None = None
    chunks: int = 0
    zero_chunks: int = 0
    cbt_audit: dict[str, int] | None = None


@dataclass
class BackupResult:
    backup_id: str
    vm: str
    mode: str
    parent: str | None
    seconds: float
    disks: list[DiskResult]
    consistency: str
    verified: str
    workers: int = 0
    in_process: bool = False  # read in the backup process itself (no worker processes)
    copy_seconds: float = 0.0
    verify_seconds: float = 0.0
    worker_peak_rss_kib: list[int] = field(default_factory=list)
    parent_peak_rss_kib: int = 0
    warnings: list[str] = field(default_factory=list)  # said during the backup (audit)

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_stored(self) -> int:
        return sum(d.bytes_stored for d in self.disks)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_read"] = self.bytes_read
        out["bytes_stored"] = self.bytes_stored
        return out


@dataclass
class _DiskState:
    no: int
    input: DiskInput
    size: int
    index: DiskIndex
    runs: list[Run]
    bytes_read: int = 0
    bytes_stored: int = 0
    chunks_new: int = 0
    chunks_reused: int = 0
    audit: AuditPlan | None = None
    audit_result: dict[str, int] | None = None

    def result(self) -> DiskResult:
        return DiskResult(
            name=self.input.name,
            virtual_size=self.size,
            bytes_read=self.bytes_read,
            bytes_stored=self.bytes_stored,
            chunks_new=self.chunks_new,
            chunks_reused=self.chunks_reused,
            full_reason=self.input.full_reason,
            chunks=len(self.index),
            zero_chunks=self.index.zero_count(),
            cbt_audit=self.audit_result,
        )


# ---------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------


class BackupSession:
    """copy → verify → commit; ``abort`` on any failure (see the module doc)."""

    def __init__(self, repo: Repository, vm: str, options: BackupOptions) -> None:
        if not vm:
            raise UsageError("a backup needs a name (--name)")
        self.repo = repo
        self.vm = vm
        self.options = options
        self.progress = options.progress
        self._state = "open"
        self._pool: ReaderPool | InlineReader | None = None
        self._disks: list[_DiskState] = []
        self._written = WrittenObjects()
        self._worker_pids: set[int] = set()
        self._t0 = time.monotonic()
        self._copy_seconds = 0.0
        self._verify_seconds = 0.0
        self._workers = 0
        self._in_process = False
        self._rss: list[int] = []
        self._pages: ChunkReader | None = None  # the parent's pages, loaded at planning
        self.warnings: list[str] = []
        self._locks = contextlib.ExitStack()
        self._locks.enter_context(repo.lock("backup"))
        try:
            # index files that exist now (W5: those written later are checked at commit)
            self._known_index = repo.index_names()
            self.parent: Manifest | None = self._resolve_parent()
            self.backup_id = repo.new_backup_id()
        except BaseException:
            self._locks.close()
            raise

    def _resolve_parent(self) -> Manifest | None:
        o = self.options
        req = SeriesRequest(self.vm, None, "full" if o.no_parent else "auto", o.parent)
        return choose_parent(self.repo, req).parent

    @property
    def mode(self) -> str:
        return "incremental" if self.parent is not None else "full"

    # -- copy ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _abort_on_failure(self) -> Iterator[None]:
        """Any failure (Ctrl-C included) rolls the session back before it propagates."""
        try:
            yield
        except KeyboardInterrupt:
            self.abort()
            raise BackupAborted(INTERRUPTED) from None
        except BaseException:
            self.abort()
            raise

    def copy(self, disks: list[DiskInput]) -> None:
        if self._state != "open":
            raise RuntimeError(f"copy() in state {self._state}")
        with self._abort_on_failure():
            self._copy(disks)
        self._state = "copied"

    def _plan(self, no: int, d: DiskInput) -> _DiskState:
        size = d.source.size
        if d.changed is None:
            index, runs = plan_full(
                d.source, self.repo.chunk_size, page_entries=self.repo.page_entries
            )
            return _DiskState(no, d, size, index, runs)
        parent = self.parent
        if parent is None or d.name not in parent.disk_names:
            raise SnapferryError(f"no parent index for disk {d.name}: run a full backup")
        if self._pages is None:  # one load of the page entries for every disk + commit
            self._pages = self.repo.reader(self.repo.chunk_index(types=(TYPE_PAGE,)))
        pidx = self.repo.load_index(parent.backup_id, d.name, parent, reader=self._pages)
        index, runs = plan_incremental(d.source, d.changed, pidx)
        st = _DiskState(no, d, size, index, runs)
        if self.options.audit > 0 and pidx.virtual_size == size:
            # CBT audit: clean chunks read like dirty ones; an honest tracker gives the
            # parent's ids back (dedup hits that store nothing)
            seed = self.options.audit_seed
            rng = random.Random(None if seed is None else seed + no)
            st.audit = plan_audit(runs, pidx, allocated_mask(d.source, pidx.chunk_size),
                                  self.options.audit, rng)
            st.runs = mask_runs(runs_mask(runs, len(pidx)) | runs_mask(
                ((int(c), 1) for c in st.audit.chunks), len(pidx)))
        return st

    def _copy(self, disks: list[DiskInput]) -> None:
        if not disks:
            raise UsageError("nothing to back up (no disks)")
        names = [d.name for d in disks]
        if len(set(names)) != len(names):
            raise UsageError(f"disk names must be unique: {names}")
        t0 = time.monotonic()
        cs = self.repo.chunk_size
        cfg = PoolConfig(
            store=self.repo.writer_spec(),
            chunk_size=cs,
            item_bytes=max(cs, self.options.item_bytes),
            verify_saved=self.options.verify == "full",
        )
        cpus = len(os.sched_getaffinity(0)) or 1
        # more readers than 4 per CPU only cost memory and connections: cap the request
        workers = min(self.options.workers or cpus, 4 * cpus)
        # Plan first (the caller's connections give the extents), then start only as
        # many workers as there are work items: a huge --workers on a small disk must
        # not start processes that will never get work.
        self._disks = [self._plan(no, d) for no, d in enumerate(disks)]
        n_items = sum(-(-sum(c for _f, c in st.runs) // cfg.item_chunks) for st in self._disks)
        workers = max(1, min(workers, n_items))
        total = sum(run_bytes(st.runs, cs, st.size) for st in self._disks)
        small = (self.options.workers == 0 and total <= self.options.inline_max_bytes
                 and all(st.input.changed is not None for st in self._disks))
        if small:
            pool: ReaderPool | InlineReader = InlineReader(
                cfg, {s.no: (s.input.source, s.size) for s in self._disks})
            self._pool = pool
        else:
            pool = self._pool = self._start_readers(cfg, workers)
        self._in_process = isinstance(pool, InlineReader)
        self._workers = pool.nworkers if isinstance(pool, ReaderPool) else 1
        self.progress.start(f"backup {self.vm}", total)

        def messages() -> Iterator[Request]:
            for st in self._disks:
                for item in make_items(st.no, st.runs, cfg.item_chunks):
                    yield Copy(item)

        pool.run(messages(), self._on_batch)
        self._check_audits(pool, cfg.item_chunks)
        pool.run([Flush()], self._on_written, broadcast=True)
        self.progress.finish()
        self._copy_seconds = time.monotonic() - t0

    def _start_readers(self, cfg: PoolConfig, workers: int) -> ReaderPool | InlineReader:
        """At most ``workers`` reader processes, within what every source allows; or the
        in-process reader when a source's server takes no client beside the caller's.

        The caller's connections stay open for the whole backup: ``qemu-nbd`` without
        ``-t`` exits when its last client leaves, so dropping the planning connection
        before the workers connect ends it. A source with ``spare_connections`` (NBD)
        is asked how many more clients its server takes right now."""
        for st in self._disks:
            src = st.input.source
            limit = getattr(src, "max_connections", None)
            spare = getattr(src, "spare_connections", None)
            if isinstance(limit, int) and limit > 0:
                if not callable(spare):
                    limit -= 1  # the caller's connection counts against it
                workers = min(workers, max(1, limit))
            if callable(spare):
                room = int(spare(workers))
                if room <= 0:
                    msg = (f"disk {st.input.name}: the NBD server takes no client beside "
                           "the planning connection: reading through that one connection "
                           "in this process, without parallel readers (serve it to 2 or "
                           "more clients, e.g. qemu-nbd -e 2, for reader workers)")
                    self.warnings.append(msg)
                    self.progress.note(f"warning: {msg}")
                    return InlineReader(cfg, {s.no: (s.input.source, s.size)
                                              for s in self._disks})
                workers = min(workers, room)
        pool = ReaderPool(cfg, workers)
        pool.start()
        self._worker_pids = {sl.proc.pid for sl in pool.slots if sl.proc.pid}
        for st in self._disks:
            pool.add_disk(st.no, st.input.source.spec(), st.size)
        return pool

    def _on_written(self, w: WrittenObjects) -> None:
        self._written.extend(w)

    def _check_audits(self, pool: ReaderPool | InlineReader, item_chunks: int) -> None:
        """Compare each audited chunk's id with the parent's. A mismatch means the
        tracker missed a write: say so, record it, and read the rest of the disk."""
        cs = self.repo.chunk_size
        for st in self._disks:
            plan = st.audit
            if plan is None:
                continue
            bad = plan.mismatched(st.index)
            st.audit_result = {"sampled": plan.sampled, "mismatched": bad,
                               "population": plan.population}
            if not bad:
                continue
            msg = (f"disk {st.input.name}: changed-block audit: {bad} of {plan.sampled} "
                   "sampled clean chunk(s) differ from the parent: the tracker missed writes; "
                   "reading the whole disk")
            self.warnings.append(msg)
            self.progress.note(f"warning: {msg}")
            read = runs_mask(st.runs, len(st.index))
            rest = full_read_runs(plan, read)
            holes = np.flatnonzero(~plan.allocated[: len(st.index)] & ~read)  # holes now
            st.index.set_many(holes, np.zeros((holes.size, 16), dtype=np.uint8))
            st.input.full_reason = (
                f"changed-block audit: {bad} of {plan.sampled} sampled clean chunk(s) "
                "differed from the parent (the tracker missed writes): full read"
            )
            st.runs = st.runs + rest
            self.progress.start(f"audit: full read of {st.input.name}",
                                run_bytes(rest, cs, st.size))
            pool.run((Copy(it) for it in make_items(st.no, rest, item_chunks)),
                     self._on_batch)
            self.progress.finish()

    def _on_batch(self, r: BatchResult) -> None:
        st = self._disks[r.disk]
        st.index.set_many(r.chunks, r.ids)
        st.bytes_read += r.bytes_read
        nonzero = r.ids.any(axis=1)
        new = int(np.count_nonzero(r.new))
        st.chunks_new += new
        st.bytes_stored += int(r.stored.sum())
        st.chunks_reused += int(np.count_nonzero(nonzero)) - new
        self._written.extend(r.written)
        self.progress.advance(r.bytes_read)

    # -- verify --------------------------------------------------------------------------
    def verify(self) -> None:
        """Every id the new indexes name is present with a valid header; with
        ``verify="full"`` the chunks this backup wrote are read back and re-hashed."""
        if self._state != "copied":
            raise RuntimeError(f"verify() in state {self._state}")
        with self._abort_on_failure():
            self._verify()
        self._state = "verified"

    def _verify(self) -> None:
        t0 = time.monotonic()
        packs = list(self._written.packs)
        self.progress.start("verify", len(packs))
        pool = self._pool
        assert pool is not None

        def counted(r: tuple[int, int]) -> None:
            self.progress.advance(r[0])

        msgs: list[Request]
        if self.options.verify == "full":
            msgs = [VerifyPacks(deep=(p,)) for p in packs]
        else:
            msgs = [VerifyPacks(quick=tuple(packs[i : i + 256])) for i in range(0, len(packs), 256)]
        pool.run(msgs, counted)
        self.progress.finish()
        pool.close()
        self._rss = pool.stats.peak_rss_kib()
        self._pool = None
        self._verify_seconds = time.monotonic() - t0

    # -- commit / abort ------------------------------------------------------------------
    def commit(
        self,
        *,
        consistency: str,
        quiesced: bool | None = None,
        freeze_ms: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> BackupResult:
        if self._state == "copied":
            self.verify()
        if self._state != "verified":
            raise RuntimeError(f"commit() in state {self._state}")
        with self._abort_on_failure():
            result = self._commit(consistency, quiesced, freeze_ms, extra)
        self._state = "committed"
        self._locks.close()
        return result

    def _commit(
        self,
        consistency: str,
        quiesced: bool | None,
        freeze_ms: float | None,
        extra: dict[str, Any] | None,
    ) -> BackupResult:
        entries: list[DiskEntry] = []
        indexes: dict[str, DiskIndex] = {}
        meta: dict[str, Any] = {}
        for st in self._disks:
            d = st.input
            entries.append(
                DiskEntry(
                    name=d.name,
                    virtual_size=st.size,
                    bytes_read=st.bytes_read,
                    bytes_stored=st.bytes_stored,
                    chunks_new=st.chunks_new,
                    chunks_reused=st.chunks_reused,
                    source=d.source.describe(),
                    tracking=dict(d.tracking),
                    full_reason=d.full_reason,
                    cbt_audit=st.audit_result,
                )
            )
            indexes[d.name] = st.index
            if d.meta:
                meta[d.name] = d.meta
        ex: dict[str, Any] = dict(extra or {})
        ex.setdefault(
            "pipeline",
            {
                "workers": self._workers,
                "in_process": self._in_process,
                "copy_seconds": round(self._copy_seconds, 3),
                "verify_seconds": round(self._verify_seconds, 3),
                "worker_peak_rss_kib": self._rss,
                "parent_peak_rss_kib": _self_peak_rss_kib(),
            },
        )
        if meta:
            ex.setdefault("disk_meta", meta)
        manifest = Manifest(
            backup_id=self.backup_id,
            vm=self.vm,
            chunk_size=self.repo.chunk_size,
            mode=self.mode,  # type: ignore[arg-type]
            parent=self.parent.backup_id if self.parent is not None else None,
            consistency=consistency,  # type: ignore[arg-type]
            quiesced=quiesced,
            freeze_ms=freeze_ms,
            disks=entries,
            extra=ex,
            verified=self.options.verify,
            identity=self.options.identity,
        )
        self.backup_id = self.repo.commit_restore_point(
            manifest, indexes, written=self._written, known_at_start=self._known_index,
            known_pages=self._pages.index if self._pages is not None else None,
        )
        return BackupResult(
            backup_id=self.backup_id,
            vm=self.vm,
            mode=self.mode,
            parent=manifest.parent,
            seconds=round(time.monotonic() - self._t0, 3),
            disks=[st.result() for st in self._disks],
            consistency=consistency,
            verified=self.options.verify,
            workers=self._workers,
            in_process=self._in_process,
            copy_seconds=round(self._copy_seconds, 3),
            verify_seconds=round(self._verify_seconds, 3),
            worker_peak_rss_kib=self._rss,
            parent_peak_rss_kib=_self_peak_rss_kib(),
            warnings=list(self.warnings),
        )

    def abort(self) -> None:
        """Roll back: stop workers, remove what this backup stored, release the lock."""
        if self._state in ("committed", "aborted"):
            return
        self._state = "aborted"
        try:
            pool, self._pool = self._pool, None
            if isinstance(pool, InlineReader):
                # its pack saver runs in this process: wait for a save under way, and
                # remove what it saved but had not reported yet
                self._written.extend(pool.terminate())
            elif pool is not None:
                pool.terminate()
            if not self.repo.has_backup(self.backup_id):
                self.repo.remove_objects(self._written)
                mine = {os.getpid(), *self._worker_pids}
                for left in self.repo.leftovers():
                    if _temp_pid(left.name) in mine:
                        with contextlib.suppress(RepositoryError, ValueError):
                            self.repo.backend.remove_leftover(left)
        finally:
            self._locks.close()


def _self_peak_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _temp_pid(name: str) -> int | None:
    """The writer's pid in a temp name ``.tmp-<name>-<pid>-<random>``."""
    parts = name.rsplit("-", 2)
    try:
        return int(parts[1]) if len(parts) == 3 else None
    except ValueError:
        return None


def run_backup(
    repo: Repository,
    vm: str,
    disks: list[DiskInput],
    options: BackupOptions,
    **commit_kwargs: Any,
) -> BackupResult:
    """copy → verify → commit in one call; aborts (and re-raises) on any failure."""
    session = BackupSession(repo, vm, options)
    try:
        session.copy(disks)
        session.verify()
        return session.commit(**commit_kwargs)
    except BaseException:
        session.abort()
        raise
