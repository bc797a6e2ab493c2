"""The reader pool: N worker processes that read, hash, dedup, compress and store chunks.

Each worker (``spawn`` context: VDDK and libnbd handles must be opened in the process
that uses them) opens its own connection to every disk from the disk's picklable
``SourceSpec`` and its own ``ChunkWriter`` from the picklable ``ChunkWriterSpec`` (its
own backend handle, copy of the chunk index and pack). The parent hands out *work items*
(runs of chunk indexes of one disk, ``item_bytes`` at most) over one pipe per worker,
with at most ``WINDOW`` items in flight per worker, so memory stays bounded. A worker
reads a run into its one reused buffer (``readinto``), and for each chunk: zero check
(→ ``NULL_ID``), keyed XXH3-128 id, dedup check (a hit is accepted only when the
BLAKE3 in the index matches the data: different data never aliases), zstd, append to
the worker's pack (saved, with its index file, when it reaches the pack size, and on
``Flush``). Chunk data never crosses a pipe: only ids, counts and object names come
back. Messages are typed dataclasses (``Tagged(tag, Copy|Flush|VerifyPacks)``,
``AddDisk``, ``Stop``; replies ``Ok``, ``Failed``, ``Bug``, ``Bye``).

The same workers do the pre-commit verification (read-back of every pack this backup
wrote: trailer, CRC, zstd, id, BLAKE3); with ``PoolConfig.verify_saved`` each worker
does it for its own packs right after saving them, and those are not read again.

Inside a worker three things overlap (``_ReadAhead``, ``PackSaver``): a thread reads
the item's next segments (1 MiB, three buffers ahead) while the worker's thread
hashes, checks and compresses the current one, and another thread saves (fsync) and
reads back the pack filled before (at most one pack saving while the next fills). The
read-ahead is used for every source but VDDK's, whose handles keep to their thread.

Signals: workers ignore SIGINT/SIGTERM (Ctrl-C reaches the whole process group); the
parent decides and kills them. A worker that dies is reported as one ``SnapferryError``.

Test-only fault points (``worker-kill``, ``worker-stall``) live in ``snapferry.engine.faults``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import resource
import signal
import sys
import threading
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
from snapferry.engine.store.chunks import ChunkWriter, ChunkWriterSpec, verify_written_pack
from snapferry.engine.store.hashing import ID_SIZE, NULL_ID, chunk_id, is_zero
from snapferry.engine.store.pack import WrittenObjects

DEFAULT_ITEM_BYTES = 8 << 20
WINDOW = 2  # work items in flight per worker (one being processed, one queued)
VERIFY_ITEM_CHUNKS = 64
SEGMENT_BYTES = 1 << 20  # the read-ahead thread reads an item in segments of this size
SEGMENT_BUFFERS = 3  # segments read or being read ahead of the one being processed

Run = tuple[int, int]  # (first chunk index, number of chunks)


@dataclass(frozen=True)
class PoolConfig:
    store: ChunkWriterSpec
    chunk_size: int
    item_bytes: int = DEFAULT_ITEM_BYTES
    # each worker reads back and checks every pack it saved, right after saving it (the
    # pre-commit verify then skips those packs: ``ReaderPool.run``)
    verify_saved: bool = False

    @property
    def segment_chunks(self) -> int:
        return max(1, min(self.item_chunks, SEGMENT_BYTES // self.chunk_size))

    @property
    def seed(self) -> int:
        return self.store.seed

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
    new: np.ndarray  # bool: this worker stored the chunk (a new blob in its pack)
    stored: np.ndarray  # int64: blob bytes written (0 unless new)
    bytes_read: int
    written: WrittenObjects = field(default_factory=WrittenObjects)  # packs saved meanwhile
    # (id, digest, raw_len) of the chunks this worker stored: passed on to the others
    fresh: list[tuple[bytes, bytes, int]] = field(default_factory=list)


# -- messages between the parent and a worker (one pipe each way) -------------------------


@dataclass(frozen=True)
class AddDisk:
    """How to open disk number ``disk`` (no reply)."""

    disk: int
    spec: SourceSpec
    size: int


@dataclass(frozen=True)
class Copy:
    item: WorkItem


@dataclass(frozen=True)
class Known:
    """Chunks other workers of this backup stored (no reply): a later copy is a hit."""

    chunks: list[tuple[bytes, bytes, int]]


@dataclass(frozen=True)
class Flush:
    """Save the worker's pending pack (and its index file); reply ``WrittenObjects``."""


@dataclass(frozen=True)
class VerifyPacks:
    """Read back ``deep`` packs fully; check that ``quick`` packs exist. Reply
    ``(objects checked, bytes read)``."""

    deep: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()


Request = AddDisk | Copy | Flush | VerifyPacks


@dataclass(frozen=True)
class Tagged:
    tag: int
    request: Request


@dataclass(frozen=True)
class Stop:
    """Exit after replying ``Bye``."""


@dataclass(frozen=True)
class Ok:
    tag: int
    value: object


@dataclass(frozen=True)
class Failed:
    tag: int
    error: SnapferryError
    # saved by the worker since its last reply (its pack saver runs ahead): the parent
    # removes these before raising, as an abort removes what was reported
    written: WrittenObjects | None = None


@dataclass(frozen=True)
class Bug:
    tag: int
    message: str
    traceback: str


@dataclass(frozen=True)
class Bye:
    chunks: int
    peak_rss_kib: int


Reply = Ok | Failed | Bug | Bye


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


Piece = tuple[int, int, int]  # (first chunk, chunks, position in the segment's buffer)


def _segments(runs: list[Run], per: int) -> list[list[Piece]]:
    """Cut an item's runs into segments of at most ``per`` chunks; short runs are
    gathered into one segment (read one after the other into one buffer)."""
    out: list[list[Piece]] = []
    cur: list[Piece] = []
    room = per
    for first, count in runs:
        while count > 0:
            take = min(count, room)
            cur.append((first, take, per - room))
            first += take
            count -= take
            room -= take
            if room == 0:
                out.append(cur)
                cur, room = [], per
    if cur:
        out.append(cur)
    return out


def _threaded_reads(src: DiskSource) -> bool:
    """May this source be read from a thread other than the one that opened it? Not
    VDDK's (its handles keep to their thread); file, qemu-nbd and libnbd sources may."""
    return type(src).__name__ != "VddkSource"


class _ReadAhead:
    """Reads one work item's segments in a thread, ``SEGMENT_BUFFERS`` ahead of the
    hashing and compression (NBD round trips and the server's work overlap with ours).
    ``next()`` gives the segments in order; ``stop()`` ends the thread (always called)."""

    def __init__(self, src: DiskSource, cs: int, size: int, segs: list[list[Piece]],
                 bufs: list[memoryview]) -> None:
        self._src, self._cs, self._size, self._segs = src, cs, size, segs
        self._free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        for b in bufs:
            self._free.put(b)
        self._ready: queue.SimpleQueue[tuple[memoryview | None, BaseException | None]] = (
            queue.SimpleQueue()
        )
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapferry-read-ahead",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for seg in self._segs:
                buf = self._free.get()
                if buf is None or self._cancel.is_set():
                    return
                _read_segment(self._src, self._cs, self._size, seg, buf)
                self._ready.put((buf, None))
        except BaseException as e:  # handed to the worker's thread by next()
            self._ready.put((None, e))

    def next(self) -> memoryview:
        buf, err = self._ready.get()
        if err is not None:
            raise err
        assert buf is not None
        return buf

    def release(self, buf: memoryview) -> None:
        self._free.put(buf)

    def stop(self) -> None:
        self._cancel.set()
        self._free.put(None)
        self._thread.join()


def _read_segment(src: DiskSource, cs: int, size: int, seg: list[Piece],
                  buf: memoryview) -> None:
    """Read a segment's pieces: all at once when the source can (NBD: several requests
    in flight for an incremental's scattered chunks), else one after the other."""
    pieces = []
    for first, take, pos in seg:
        off = first * cs
        length = min(take * cs, size - off)
        if length <= 0:
            raise SnapferryError(f"chunk {first} lies beyond the end of the disk")
        pieces.append((pos * cs, off, length))
    many = getattr(src, "readinto_pieces", None)
    if len(pieces) > 1 and callable(many):
        many(buf, pieces)
        return
    for p, off, length in pieces:
        src.readinto(buf[p : p + length], off)


class _Worker:
    def __init__(self, cfg: PoolConfig, worker_no: int) -> None:
        self.cfg = cfg
        self.no = worker_no
        self.writer = ChunkWriter(cfg.store, background=True, verify_saved=cfg.verify_saved)
        self.specs: dict[int, tuple[SourceSpec, int]] = {}
        self.sources: dict[int, DiskSource] = {}
        seg_bytes = cfg.segment_chunks * cfg.chunk_size
        self.bufs = [memoryview(bytearray(seg_bytes)) for _ in range(SEGMENT_BUFFERS)]
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
        with contextlib.suppress(Exception):
            self.writer.close()

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
        fresh: list[tuple[bytes, bytes, int]] = []
        bytes_read = 0
        k = 0
        store, digest = self.writer.store, self.writer.digest
        seed = self.cfg.seed
        hooks = self.faults.any
        for first, count in item.runs:
            if (first + count - 1) * cs >= size or first < 0:
                raise SnapferryError(
                    f"chunk {first + count - 1} lies beyond the end of disk {item.disk}")
        segs = _segments(item.runs, self.cfg.segment_chunks)
        ahead = _ReadAhead(src, cs, size, segs, self.bufs) if _threaded_reads(src) else None
        try:
            for seg in segs:
                if hooks:
                    self.faults.check(self.done_chunks)
                if ahead is not None:
                    mv = ahead.next()
                else:
                    mv = self.bufs[0]
                    _read_segment(src, cs, size, seg, mv)
                for c0, take, pos in seg:
                    length = min(take * cs, size - c0 * cs)
                    bytes_read += length
                    chunks[k : k + take] = np.arange(c0, c0 + take, dtype=np.int64)
                    base = pos * cs
                    for j in range(take):
                        a = base + j * cs
                        b = min(a + cs, base + length)
                        data = mv[a:b]
                        if not is_zero(data):
                            cid = chunk_id(seed, data)
                            # A dedup hit must be an undamaged copy of the same data (the
                            # BLAKE3 recorded in the index); other data under the id raises.
                            dg = digest(data)
                            got = store(cid, data, dg)
                            if got.new:
                                new[k] = True
                                stored[k] = got.stored
                                fresh.append((cid, dg, b - a))
                            idbuf[k * ID_SIZE : (k + 1) * ID_SIZE] = cid
                        k += 1
                    self.done_chunks += take
                if ahead is not None:
                    ahead.release(mv)
        finally:
            if ahead is not None:
                ahead.stop()
        ids = np.frombuffer(idbuf, dtype=np.uint8).reshape(n, ID_SIZE)
        return BatchResult(
            item.disk, chunks, ids, new, stored, bytes_read, self.writer.take_written(), fresh
        )

    def verify(self, msg: VerifyPacks) -> tuple[int, int]:
        backend = self.writer.backend
        nbytes = 0
        for name in msg.quick:
            if backend.stat("data", name) is None:
                raise CorruptionError(f"pack {name[:16]} written by this backup is missing")
        for name in msg.deep:
            if name in self.writer.verified:
                continue  # this worker read it back right after saving it
            nbytes += verify_written_pack(backend, name, self.cfg.seed)
        return len(msg.quick) + len(msg.deep), nbytes

    def saved_so_far(self) -> WrittenObjects | None:
        try:
            return self.writer.take_written()
        except Exception:
            return None

    def handle(self, req: Request) -> object:
        if isinstance(req, Copy):
            return self.copy(req.item)
        if isinstance(req, Flush):
            return self.writer.flush()
        if isinstance(req, VerifyPacks):
            return self.verify(req)
        raise ValueError(f"unknown request {req!r}")


def _peak_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _large_buffers_to_the_kernel() -> None:
    """glibc raises its mmap threshold to 32 MiB once a 32 MiB block was freed, after
    which packs (the one filling, the one saving, the one read back) come from the heap
    and stay in the worker's RSS after use: fix the threshold at 1 MiB (``mallopt
    M_MMAP_THRESHOLD``), so a buffer of 1 MiB or more is mapped and unmapped. Not glibc:
    nothing to do."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def worker_main(conn: Connection, cfg: PoolConfig, worker_no: int) -> None:
    """Entry point of a worker process (module level: picklable for ``spawn``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _large_buffers_to_the_kernel()
    w = _Worker(cfg, worker_no)
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # parent gone
            if isinstance(msg, Stop):
                conn.send(Bye(w.done_chunks, _peak_rss_kib()))
                w.close()
                conn.close()
                # nothing left to do: skip the interpreter's teardown (module and numpy
                # finalisation, a tenth of a second per worker the parent waits for)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            if isinstance(msg, AddDisk):
                w.specs[msg.disk] = (msg.spec, msg.size)
                continue  # no reply
            if isinstance(msg, Known):
                w.writer.learn(msg.chunks)
                continue  # no reply
            assert isinstance(msg, Tagged), msg
            try:
                conn.send(Ok(msg.tag, w.handle(msg.request)))
            except SnapferryError as e:
                conn.send(Failed(msg.tag, e, w.saved_so_far()))
            except (BrokenPipeError, ConnectionResetError):
                raise  # the parent is gone: below
            except Exception as e:
                conn.send(Bug(msg.tag, f"{type(e).__name__}: {e}", traceback.format_exc()))
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


_SH = "/bin/sh"


@contextlib.contextmanager
def _ignoring_stop_signals() -> Iterator[None]:
    """SIGINT/SIGTERM held back while a worker is started (one ``Process.start``):

    * the parent's handlers do not run inside ``Process.start``: interrupted between
      the exec and the hand-over of its preparation data, a child printed ``EOFError``
      and was left behind (issue 15). A signal arriving meanwhile, on any thread, is
      recorded and delivered when the start is over, never lost (ignoring both
      process-wide, the previous way, discarded a SIGTERM the kernel handed to another
      thread, e.g. numpy's OpenBLAS one, and the backup went on);
    * the worker execs with SIGINT *ignored* (a disposition that survives the exec; a
      blocked mask does not reach a spawned child): a Ctrl-C to the process group during
      its start-up (imports, unpickling: up to a second under load) cannot print a
      KeyboardInterrupt traceback from ``spawn_main``. ``/bin/sh`` sets that
      disposition and execs the interpreter, so the parent never ignores SIGINT and a
      Ctrl-C during the fork + exec is deferred like any other. SIGTERM is not sent to
      workers by a terminal (a SIGTERM to the whole group kills a starting worker
      silently); ``worker_main`` ignores both.

    Off the main thread, where handlers cannot be changed, the signals are blocked
    instead (best effort)."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(sigs))
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return
    caught: list[int] = []

    def defer(signum: int, _frame: object) -> None:
        caught.append(signum)

    real_spawn = getattr(_mp_util, "spawnv_passfds", None)

    def spawn_without_sigint(path: str | bytes, args: list[str], passfds: Any) -> int:
        # the worker's interpreter must start with SIGINT ignored, but this process must
        # not ignore it even for the fork + exec (a Ctrl-C then was lost): a shell sets
        # the disposition (it survives the exec) and execs the interpreter, passed fds kept
        assert real_spawn is not None
        argv = [_SH, "-c", 'trap "" INT; exec "$0" "$@"', os.fsdecode(path), *args[1:]]
        sh: Any = os.fsencode(_SH) if isinstance(path, bytes) else _SH
        return int(real_spawn(sh, argv, passfds))

    old = [signal.signal(s, defer) for s in sigs]
    if real_spawn is not None:
        _mp_util.spawnv_passfds = spawn_without_sigint  # type: ignore[assignment]
    else:  # another multiprocessing: ignore for the whole start (a Ctrl-C may be lost)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if real_spawn is not None:
            _mp_util.spawnv_passfds = real_spawn
        for s, h in zip(sigs, old, strict=True):
            signal.signal(s, h)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)  # to the restored handler (Ctrl-C: KeyboardInterrupt)


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
        self.outbox: list[tuple[bytes, bytes, int]] = []  # other workers' new chunks
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
        self._verified: set[str] = set()  # packs their writers read back once saved

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        ctx = mp.get_context("spawn")
        try:
            with _main_hidden():
                self._spawn(ctx)
        except BaseException:
            self.terminate()
            raise
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
            with _ignoring_stop_signals():
                proc.start()
                # in the slots before a deferred signal is delivered: an abort kills it
                self.slots.append(_Slot(no, proc, parent_conn))
                child_conn.close()

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
            self._send(s, AddDisk(disk, spec, size))

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
                    s.conn.send(Stop())
        deadline = time.monotonic() + timeout
        for s in slots:
            if not s.alive:
                continue
            try:
                if s.conn.poll(max(0.0, deadline - time.monotonic())):
                    msg = s.conn.recv()
                    if isinstance(msg, Bye):
                        self.stats.workers.append(
                            WorkerStats(s.no, s.proc.pid or 0, msg.chunks, msg.peak_rss_kib)
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
    def _send(self, s: _Slot, msg: Tagged | AddDisk | Known | Stop) -> None:
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

    def _remove(self, w: WrittenObjects) -> None:
        """Remove what a failing worker saved and never reported (index files first)."""
        if not (w.packs or w.indexes):
            return
        try:
            backend = self.cfg.store.backend.open()
        except SnapferryError:
            return  # left unreferenced: prune reclaims it
        try:
            for kind, names in (("index", w.indexes), ("data", w.packs)):
                for name in names:
                    with contextlib.suppress(SnapferryError):
                        backend.remove(kind, name)
        finally:
            backend.close()

    def _next_tag(self) -> int:
        self._tag += 1
        return self._tag

    def run(
        self,
        messages: Iterable[Request],
        on_result: Callable[[Any], None],
        *,
        broadcast: bool = False,
    ) -> None:
        """Send each request to a free worker (or to every worker
        with ``broadcast``) and call ``on_result`` with each reply in the parent.
        Raises the first error a worker reports, or ``WorkerDied``."""
        if self._closed:
            raise RuntimeError("the reader pool is closed")
        user_result = on_result

        def got(value: Any, sender: _Slot) -> None:
            w = value.written if isinstance(value, BatchResult) else value
            if isinstance(w, WrittenObjects):
                self._verified.update(w.verified)
            if isinstance(value, BatchResult) and value.fresh and len(self.slots) > 1:
                # tell the other workers (sent before their next item): a copy of the
                # same data they meet later is a hit, not a second blob
                for o in self.slots:
                    if o is not sender and o.alive:
                        o.outbox.extend(value.fresh)
            user_result(value)

        def unverified(msgs: Iterable[Request]) -> Iterator[Request]:
            """Packs their writer already read back and checked (``verify_saved``) are
            counted as checked here instead of being read a second time."""
            for m in msgs:
                if isinstance(m, VerifyPacks) and self._verified.intersection(m.deep):
                    rest = tuple(p for p in m.deep if p not in self._verified)
                    user_result((len(m.deep) - len(rest), 0))
                    if not rest and not m.quick:
                        continue
                    m = VerifyPacks(deep=rest, quick=m.quick)
                yield m

        messages = unverified(messages)
        it: Iterator[Any]
        if broadcast:
            msgs = list(messages)
            it = iter([])
            for s in self.slots:
                for m in msgs:
                    tag = self._next_tag()
                    self._send(s, Tagged(tag, m))
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
                        if s.outbox:
                            self._send(s, Known(s.outbox))
                            s.outbox = []
                        tag = self._next_tag()
                        self._send(s, Tagged(tag, nxt))
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
                if isinstance(msg, Ok):
                    got(msg.value, s)
                elif isinstance(msg, Failed):
                    if msg.written is not None:
                        self._remove(msg.written)
                    raise msg.error
                elif isinstance(msg, Bug):
                    raise WorkerBug(f"reader worker {s.no} failed: {msg.message}", msg.traceback)
                else:
                    raise WorkerBug(f"reader worker {s.no} sent {msg!r}", "")


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


__all__ = [
    "NULL_ID",
    "AddDisk",
    "BatchResult",
    "Copy",
    "Flush",
    "PoolConfig",
    "PoolStats",
    "ReaderPool",
    "VerifyPacks",
    "WorkItem",
    "WorkerBug",
    "WorkerDied",
    "make_items",
    "worker_main",
]
