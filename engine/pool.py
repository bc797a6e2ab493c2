"""The reader pool: N worker processes that read, hash, dedup, compress and store chunks.

Each worker (``spawn`` context: VDDK and libnbd handles must be opened in the process
that uses them) opens its own connection to every disk from the disk's picklable
``SourceSpec`` and its own ``LocalChunkStore``. The parent hands out *work items*
(runs of chunk indexes of one disk, ``item_bytes`` at most) over one pipe per worker,
with at most ``WINDOW`` items in flight per worker, so memory stays bounded. A worker
reads a run into its one reused buffer (``readinto``), and for each chunk: zero check
(→ ``NULL_ID``), keyed XXH3-128 id, dedup check (a hit is accepted only when the
stored BLAKE3 matches the data: different data never aliases), zstd, ``put``. Chunk
data never crosses a pipe: only ids and counts come back.

The same workers do the pre-commit verification (headers of every referenced chunk;
read-back, decode and re-hash of the chunks this backup wrote).

Signals: workers ignore SIGINT/SIGTERM (Ctrl-C reaches the whole process group); the
parent decides and kills them. A worker that dies is reported as one ``SnapferryError``.

Test-only fault points (``worker-kill``, ``worker-stall``) live in ``snapferry.engine.faults``.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import resource
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import util as _mp_util
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

import numpy as np

from snapferry.engine.errors import CorruptionError, SnapferryError
from snapferry.engine.faults import worker_faults
from snapferry.engine.source import DiskSource, SourceSpec
from snapferry.engine.store.chunkfmt import compressor, decode_verified, encode_chunk
from snapferry.engine.store.hashing import ID_SIZE, NULL_ID, chunk_id, is_zero, strong_digest
from snapferry.engine.store.local import LocalChunkStore

DEFAULT_ITEM_BYTES = 8 << 20
WINDOW = 2  # work items in flight per worker (one being processed, one queued)
VERIFY_ITEM_CHUNKS = 64

Run = tuple[int, int]  # (first chunk index, number of chunks)


@dataclass(frozen=True)
class PoolConfig:
    repo_path: str
    seed: int
    chunk_size: int
    zstd_level: int
    item_bytes: int = DEFAULT_ITEM_BYTES

    @property
    def item_chunks(self) -> int:
        return max(1, self.item_bytes // self.chunk_size)


@dataclass(frozen=True)
class WorkItem:
    disk: int
    runs: list[Run]

    @property
    def chunks(self) -> int:
        return sum(n for _f, n in self.runs)


@dataclass
class BatchResult:
    """What a worker reports for one work item (no chunk data)."""

    disk: int
    chunks: np.ndarray  # int64 chunk indexes
    ids: np.ndarray  # (n, 16) uint8
    new: np.ndarray  # bool: this put created the chunk
    stored: np.ndarray  # int64: blob bytes written (0 unless new)
    bytes_read: int


@dataclass
class WorkerStats:
    worker: int
    pid: int
    chunks: int = 0
    peak_rss_kib: int = 0


@dataclass
class PoolStats:
    workers: list[WorkerStats] = field(default_factory=list)

    def peak_rss_kib(self) -> list[int]:
        return [w.peak_rss_kib for w in self.workers]


# ---------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, cfg: PoolConfig, worker_no: int) -> None:
        self.cfg = cfg
        self.no = worker_no
        self.store = LocalChunkStore(cfg.repo_path)
        self.specs: dict[int, tuple[SourceSpec, int]] = {}
        self.sources: dict[int, DiskSource] = {}
        self.buf = bytearray(max(cfg.item_bytes, cfg.chunk_size))
        self.mv = memoryview(self.buf)
        self.cctx = compressor(cfg.zstd_level)
        self.done_chunks = 0
        self.faults = worker_faults()

    def source(self, disk: int) -> DiskSource:
        src = self.sources.get(disk)
        if src is None:
            spec, _size = self.specs[disk]
            src = self.sources[disk] = spec.open()
        return src

    def close(self) -> None:
        for src in self.sources.values():
            with contextlib.suppress(Exception):
                src.close()
        self.sources.clear()

    def copy(self, item: WorkItem) -> BatchResult:
        cs = self.cfg.chunk_size
        _spec, size = self.specs[item.disk]
        src = self.source(item.disk)
        n = item.chunks
        chunks = np.empty(n, dtype=np.int64)
        # ids collect in one bytearray (zero = NULL_ID) and become an array at the end:
        # a per-chunk numpy conversion cost more than the id itself
        idbuf = bytearray(n * ID_SIZE)
        new = np.zeros(n, dtype=bool)
        stored = np.zeros(n, dtype=np.int64)
        bytes_read = 0
        k = 0
        bufchunks = len(self.buf) // cs
        store = self.store
        has_valid = store.has_valid
        put = store.put
        seed = self.cfg.seed
        level = self.cfg.zstd_level
        cctx = self.cctx
        mv = self.mv
        hooks = self.faults.any
        for first, count in item.runs:
            c = first
            end_chunk = first + count
            while c < end_chunk:
                take = min(bufchunks, end_chunk - c)
                off = c * cs
                length = min(take * cs, size - off)
                if length <= 0:
                    raise SnapferryError(f"chunk {c} lies beyond the end of disk {item.disk}")
                if hooks:
                    self.faults.check(self.done_chunks)
                src.readinto(mv[:length], off)
                bytes_read += length
                chunks[k : k + take] = np.arange(c, c + take, dtype=np.int64)
                for j in range(take):
                    a = j * cs
                    b = min(a + cs, length)
                    data = mv[a:b]
                    if not is_zero(data):
                        cid = chunk_id(seed, data)
                        digest = strong_digest(data)
                        # A dedup hit must be an intact chunk of the same data:
                        # has_valid() raises on an alias (same id, other data) and
                        # says False for a chunk file torn by an earlier crash, which
                        # put(replace=True) then replaces.
                        if not has_valid(cid, digest, b - a):
                            blob = encode_chunk(data, level=level, cctx=cctx, digest=digest)
                            if put(cid, blob, replace=True):
                                new[k] = True
                                stored[k] = len(blob)
                            elif not has_valid(cid, digest, b - a):
                                raise CorruptionError(
                                    f"chunk {cid.hex()} could not be stored intact"
                                )
                        idbuf[k * ID_SIZE : (k + 1) * ID_SIZE] = cid
                    k += 1
                self.done_chunks += take
                c += take
        ids = np.frombuffer(idbuf, dtype=np.uint8).reshape(n, ID_SIZE)
        return BatchResult(item.disk, chunks, ids, new, stored, bytes_read)

    def verify(self, quick: bytes, deep: bytes) -> tuple[int, int]:
        store = self.store
        nbytes = 0
        count = 0
        for i in range(0, len(quick), ID_SIZE):
            store.header(quick[i : i + ID_SIZE])
            count += 1
        for i in range(0, len(deep), ID_SIZE):
            cid = deep[i : i + ID_SIZE]
            blob = store.get(cid)
            try:
                decode_verified(blob, cid, self.cfg.seed, strong=False)
            except CorruptionError as e:
                raise CorruptionError(f"chunk {cid.hex()} written by this backup: {e}") from None
            nbytes += len(blob)
            count += 1
        return count, nbytes


def _peak_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def worker_main(conn: Connection, cfg: PoolConfig, worker_no: int) -> None:
    """Entry point of a worker process (module level: picklable for ``spawn``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    w = _Worker(cfg, worker_no)
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # parent gone
            if msg is None:
                conn.send(("bye", w.done_chunks, _peak_rss_kib()))
                return
            kind, tag = msg[0], msg[1]
            try:
                if kind == "disk":
                    _k, _t, disk, spec, size = msg
                    w.specs[disk] = (spec, size)
                    continue  # no reply
                if kind == "copy":
                    conn.send(("ok", tag, w.copy(msg[2])))
                elif kind == "verify":
                    conn.send(("ok", tag, w.verify(msg[2], msg[3])))
                elif kind == "sync":
                    w.store.sync()
                    conn.send(("ok", tag, None))
                else:
                    raise ValueError(f"unknown message {kind!r}")
            except SnapferryError as e:
                conn.send(("error", tag, e))
            except (BrokenPipeError, ConnectionResetError):
                raise  # the parent is gone: below
            except Exception as e:
                conn.send(("bug", tag, f"{type(e).__name__}: {e}", traceback.format_exc()))
    except (BrokenPipeError, ConnectionResetError):
        return  # the parent died (killed backup): an orphan leaves quietly, no traceback
    finally:
        w.close()


# ---------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------


class WorkerDied(SnapferryError):
    """A reader worker process ended unexpectedly (killed, crashed)."""


class WorkerBug(RuntimeError):
    """A worker raised an unexpected exception (a bug); carries its traceback text."""

    def __init__(self, message: str, tb: str) -> None:
        super().__init__(message)
        self.worker_traceback = tb


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start workers without re-running the parent's ``__main__`` in them.

    ``spawn`` normally re-imports the main script in each child, which breaks callers
    whose script has no ``if __name__ == "__main__"`` guard and costs start-up time.
    The worker needs only ``snapferry.engine.pool``, so hide the main module's path while the
    children are launched (their preparation data is taken in ``Process.start``).
    """
    main = sys.modules.get("__main__")
    saved: dict[str, Any] = {}
    if main is not None:
        saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


_LIVE: weakref.WeakSet[ReaderPool] = weakref.WeakSet()


assert _mp_util is not None  # imported first: its exit handler must be registered before ours


@atexit.register
def _kill_live_pools() -> None:
    """Workers ignore SIGTERM, so multiprocessing's exit handler (terminate + join of
    daemon children) would wait for ever on a pool a caller never closed: kill them
    first (atexit runs this before multiprocessing's handler, registered earlier)."""
    for pool in list(_LIVE):
        pool.terminate()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class _Slot:
    def __init__(self, no: int, proc: Any, conn: Connection) -> None:
        self.no = no
        self.proc = proc
        self.conn = conn
        self.pending: deque[int] = deque()
        self.alive = True
        self.reaped = False  # joined and closed


class ReaderPool:
    """N worker processes; use as a context manager (``close`` or ``terminate``)."""

    def __init__(self, cfg: PoolConfig, workers: int) -> None:
        self.cfg = cfg
        self.nworkers = max(1, workers)
        self.slots: list[_Slot] = []
        self.stats = PoolStats()
        self._tag = 0
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        ctx = mp.get_context("spawn")
        sigs = {signal.SIGINT, signal.SIGTERM}
        # Block SIGINT/SIGTERM while spawning: children inherit the mask, so a Ctrl-C
        # during their start-up cannot print a traceback; they ignore both, then unblock.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            with _main_hidden():
                self._spawn(ctx)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            self.terminate()
            raise
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        # Workers ignore SIGTERM, so multiprocessing's own exit handler (terminate +
        # join of daemon children) would wait for ever if a caller never closed the
        # pool: kill them at interpreter exit (atexit runs this before that handler).
        _LIVE.add(self)

    def _spawn(self, ctx: Any) -> None:
        for no in range(self.nworkers):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=worker_main,
                args=(child_conn, self.cfg, no),
                name=f"snapferry-reader-{no}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            self.slots.append(_Slot(no, proc, parent_conn))

    def __enter__(self) -> ReaderPool:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()

    def add_disk(self, disk: int, spec: SourceSpec, size: int) -> None:
        """Tell every worker how to open disk number ``disk`` (opened on first use)."""
        for s in self.slots:
            self._send(s, ("disk", 0, disk, spec, size))

    def shrink(self, workers: int) -> None:
        """Kill the workers beyond the first ``workers`` (there is less work than
        workers); only before any work was sent to them: they have done nothing."""
        n = max(1, workers)
        extra = self.slots[n:]
        if extra:
            del self.slots[n:]
            self.nworkers = len(self.slots)
            self._kill(extra)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers gracefully and collect their statistics."""
        if self._closed:
            return
        self._closed = True
        self._stop(self.slots, timeout)
        self._unregister()

    def _stop(self, slots: list[_Slot], timeout: float) -> None:
        """Ask ``slots`` to exit, collect their statistics, wait, then kill stragglers."""
        for s in slots:
            if s.alive:
                with contextlib.suppress(OSError, ValueError):
                    s.conn.send(None)
        deadline = time.monotonic() + timeout
        for s in slots:
            if not s.alive:
                continue
            try:
                if s.conn.poll(max(0.0, deadline - time.monotonic())):
                    msg = s.conn.recv()
                    if msg and msg[0] == "bye":
                        self.stats.workers.append(
                            WorkerStats(s.no, s.proc.pid or 0, msg[1], msg[2])
                        )
            except (EOFError, OSError):
                pass
            s.proc.join(max(0.0, deadline - time.monotonic()))
        self._kill(slots)

    def terminate(self) -> None:
        """Kill every worker at once (abort); idempotent."""
        self._closed = True
        self._kill_all()

    def _unregister(self) -> None:
        _LIVE.discard(self)

    def _kill_all(self) -> None:
        self._kill(self.slots)
        self._unregister()

    def _kill(self, slots: list[_Slot]) -> None:
        slots = [s for s in slots if not s.reaped]
        for s in slots:
            if s.proc.is_alive():
                with contextlib.suppress(OSError):
                    s.proc.kill()
        for s in slots:
            s.proc.join(5.0)
            s.alive = False
            s.reaped = True
            with contextlib.suppress(OSError):
                s.conn.close()
            with contextlib.suppress(ValueError):
                s.proc.close()

    # -- dispatch ------------------------------------------------------------------------
    def _send(self, s: _Slot, msg: tuple[Any, ...]) -> None:
        try:
            s.conn.send(msg)
        except (OSError, ValueError):
            self._died(s)

    def _died(self, s: _Slot) -> NoReturn:
        s.proc.join(1.0)
        code = s.proc.exitcode
        s.alive = False
        raise WorkerDied(
            f"reader worker {s.no} (pid {s.proc.pid}) {_exit_text(code)} during the backup; "
            "nothing was committed"
        )

    def _next_tag(self) -> int:
        self._tag += 1
        return self._tag

    def run(
        self,
        messages: Iterable[tuple[Any, ...]],
        on_result: Callable[[Any], None],
        *,
        broadcast: bool = False,
    ) -> None:
        """Send each ``(kind, payload...)`` message to a free worker (or to every worker
        with ``broadcast``) and call ``on_result`` with each reply in the parent.
        Raises the first error a worker reports, or ``WorkerDied``."""
        if self._closed:
            raise RuntimeError("the reader pool is closed")
        it: Iterator[Any]
        if broadcast:
            msgs = list(messages)
            it = iter([])
            for s in self.slots:
                for m in msgs:
                    tag = self._next_tag()
                    self._send(s, (m[0], tag, *m[1:]))
                    s.pending.append(tag)
        else:
            it = iter(messages)
        exhausted = broadcast
        by_conn: dict[Any, _Slot] = {s.conn: s for s in self.slots}
        by_sentinel: dict[Any, _Slot] = {s.proc.sentinel: s for s in self.slots}
        while True:
            if not exhausted:
                for s in self.slots:
                    while len(s.pending) < WINDOW:
                        nxt = next(it, None)
                        if nxt is None:
                            exhausted = True
                            break
                        tag = self._next_tag()
                        self._send(s, (nxt[0], tag, *nxt[1:]))
                        s.pending.append(tag)
                    if exhausted:
                        break
            if exhausted and not any(s.pending for s in self.slots):
                return
            waitables: list[Any] = []
            for s in self.slots:
                if s.pending:
                    waitables.append(s.conn)
                    waitables.append(s.proc.sentinel)
            ready = wait(waitables)
            for r in ready:
                s = by_conn.get(r) or by_sentinel[r]
                if not s.pending:
                    continue
                if r is s.proc.sentinel and not s.conn.poll():
                    self._died(s)
                try:
                    msg = s.conn.recv()
                except (EOFError, OSError):
                    self._died(s)
                s.pending.popleft()
                if msg[0] == "ok":
                    on_result(msg[2])
                elif msg[0] == "error":
                    raise msg[2]
                else:
                    raise WorkerBug(f"reader worker {s.no} failed: {msg[2]}", msg[3])


def make_items(disk: int, runs: Iterable[Run], item_chunks: int) -> Iterator[WorkItem]:
    """Cut chunk runs of one disk into work items of at most ``item_chunks`` chunks."""
    cur: list[Run] = []
    room = item_chunks
    for first, count in runs:
        while count > 0:
            take = min(count, room)
            cur.append((first, take))
            first += take
            count -= take
            room -= take
            if room == 0:
                yield WorkItem(disk, cur)
                cur, room = [], item_chunks
    if cur:
        yield WorkItem(disk, cur)


def verify_messages(
    quick: list[bytes], deep: list[bytes], per_item: int = VERIFY_ITEM_CHUNKS
) -> Iterator[tuple[str, bytes, bytes]]:
    """``verify`` messages: header checks for ``quick`` ids, read-back for ``deep`` ids."""
    for i in range(0, len(deep), per_item):
        yield ("verify", b"", b"".join(deep[i : i + per_item]))
    step = per_item * 16
    for i in range(0, len(quick), step):
        yield ("verify", b"".join(quick[i : i + step]), b"")


__all__ = [
    "NULL_ID",
    "BatchResult",
    "PoolConfig",
    "PoolStats",
    "ReaderPool",
    "WorkItem",
    "WorkerBug",
    "WorkerDied",
    "make_items",
    "verify_messages",
    "worker_main",
]
