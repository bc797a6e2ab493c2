"""The reader pool's stand-in when a source takes no second client.

``qemu-nbd`` without ``-e`` (one client at a time) and without ``-t`` (exits when its
last client leaves) can be read only through the connection the backup planned with:
a worker's own connection would wait unanswered in the server's backlog, and dropping
the planning connection first ends the server. ``InlineReader`` does the workers' job —
read, zero check, id, dedup, compress, store, pre-commit verify — in the backup process
itself, through the caller's open sources, with one ``ChunkWriter``. It offers the part
of ``ReaderPool``'s interface that ``BackupSession`` uses (``run``, ``close``,
``terminate``, ``stats``).

With more than one CPU the per-chunk work that releases the GIL — BLAKE3 and zstd,
four fifths of a small incremental's copy — runs in ``compute_threads`` threads
(``_ThreadedWorker``), a segment ahead of the thread that decides and stores (dedup,
seal, append: ``ChunkWriter.store``, in order, as the workers do). A worker process
needs no such threads: the pool already has one process per CPU.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from snapferry.engine.errors import CorruptionError, SnapferryError
from snapferry.engine.pool import (
    BatchResult,
    Piece,
    PoolConfig,
    PoolStats,
    Request,
    WorkerStats,
    WorkItem,
    _read_segment,
    _ReadAhead,
    _segments,
    _threaded_reads,
)
from snapferry.engine.pool import _Worker as Worker
from snapferry.engine.source import DiskSource
from snapferry.engine.store.blobs import encode
from snapferry.engine.store.chunks import WrittenObjects
from snapferry.engine.store.hashing import ID_SIZE, chunk_id, is_zero

Prepared = tuple[bytes, bytes, tuple[int, bytes | memoryview] | None, bool | None] | None
"""A chunk worked on ahead: None (all zero) or (id, digest, its encoding or None when it
is a dedup hit already, the index lookup's answer or None to look again)."""


class InlineReader:
    """One in-process reader over already open sources (``{disk no: (source, size)}``);
    the sources stay the caller's: closing the reader does not close them."""

    def __init__(self, cfg: PoolConfig, sources: dict[int, tuple[DiskSource, int]],
                 *, compute_threads: int | None = None) -> None:
        n = compute_threads if compute_threads is not None else _cpus()
        self._worker: Worker | None = _ThreadedWorker(cfg, n) if n > 1 else Worker(cfg, 0)
        self._disks = set(sources)
        for disk, (src, size) in sources.items():
            self._worker.specs[disk] = (src.spec(), size)
            self._worker.sources[disk] = src
        self.stats = PoolStats()

    def run(
        self,
        messages: Iterable[Request],
        on_result: Callable[[Any], None],
        *,
        broadcast: bool = False,
    ) -> None:
        """Handle each request here, in order; errors propagate as the worker raises
        them (``broadcast`` is the same thing with one reader)."""
        w = self._worker
        if w is None:
            raise RuntimeError("the in-process reader is closed")
        for msg in messages:
            try:
                result = w.handle(msg)
            except BaseException as e:
                _drop_frames(e)
                raise
            on_result(result)

    def _shut(self) -> Worker | None:
        w, self._worker = self._worker, None
        if w is not None:
            for disk in self._disks:
                w.sources.pop(disk, None)  # the caller's: not ours to close
            w.close()
        return w

    def close(self) -> None:
        w = self._shut()
        if w is not None:
            rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            self.stats.workers.append(WorkerStats(0, os.getpid(), w.done_chunks, rss))

    def terminate(self) -> WrittenObjects:
        """Stop here (a failure or a signal): waits for a pack save under way (it runs
        on this process's saver thread) and returns what was saved and not yet
        reported, for the caller to remove."""
        w = self._worker
        left = WrittenObjects()
        if w is not None:
            saver = w.writer.saver
            if saver is not None:
                with contextlib.suppress(BaseException):
                    saver.wait()  # the pack being filled is not saved: abort drops it
            with contextlib.suppress(Exception):
                left = w.writer.take_written()
        self._shut()
        return left


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


class _ThreadedWorker(Worker):
    """``_Worker`` whose ``copy`` hands the zero check, id, BLAKE3 and zstd of each
    chunk to ``threads`` threads (both hashes and zstd release the GIL), one segment
    ahead of this thread, which takes the results in disk order and stores them. What
    is stored, and every check made on the way, is what ``_Worker.copy`` does: the
    threads only compute; the dedup decision (and its collision check) stays in
    ``ChunkWriter.store``."""

    def __init__(self, cfg: PoolConfig, threads: int) -> None:
        super().__init__(cfg, 0)
        self.threads = threads
        self._exec: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._exec is None:
            self._exec = ThreadPoolExecutor(self.threads, thread_name_prefix="snapferry-chunk")
        return self._exec

    def close(self) -> None:
        ex, self._exec = self._exec, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
        super().close()

    def _prepare(self, data: memoryview) -> Prepared:
        if is_zero(data):
            return None
        cid = chunk_id(self.cfg.seed, data)
        w = self.writer
        dg = w.digest(data)
        indexed: bool | None
        try:  # the loaded index does not change during the copy: ``store`` takes this
            indexed = w.index.lookup_valid(cid, dg, data.nbytes)
        except CorruptionError:
            indexed = None  # ``store`` looks again and raises it, in disk order
        hit = indexed or cid in w.session  # session: a hint; ``store`` decides
        return cid, dg, None if hit else encode(data, level=w.spec.zstd_level), indexed

    def _prepare_many(self, views: list[memoryview]) -> list[Prepared]:
        return [self._prepare(v) for v in views]

    def copy(self, item: WorkItem) -> BatchResult:
        cs = self.cfg.chunk_size
        _spec, size = self.specs[item.disk]
        src = self.source(item.disk)
        n = item.chunks
        for first, count in item.runs:
            if (first + count - 1) * cs >= size or first < 0:
                raise SnapferryError(
                    f"chunk {first + count - 1} lies beyond the end of disk {item.disk}")
        chunks = np.empty(n, dtype=np.int64)
        idbuf = bytearray(n * ID_SIZE)
        new = np.zeros(n, dtype=bool)
        stored = np.zeros(n, dtype=np.int64)
        fresh: list[tuple[bytes, bytes, int]] = []
        store = self.writer.store
        ex = self._executor()
        segs = _segments(item.runs, self.cfg.segment_chunks)
        threaded = _threaded_reads(src)
        ahead = _ReadAhead(src, cs, size, segs, self.bufs) if threaded else None
        # (segment, its buffer, one future per thread's share of its chunks): at most two
        # segments in hand
        pending: deque[tuple[list[Piece], memoryview, list[Future[list[Prepared]]]]] = deque()
        k = 0
        bytes_read = 0

        def finish() -> None:
            nonlocal k, bytes_read
            seg, mv, futs = pending.popleft()
            if self.faults.any:  # where _Worker.copy checks: before a segment is stored
                self.faults.check(self.done_chunks)
            preps = [p for f in futs for p in f.result()]
            j = 0
            for c0, take, pos in seg:
                length = min(take * cs, size - c0 * cs)
                bytes_read += length
                chunks[k : k + take] = np.arange(c0, c0 + take, dtype=np.int64)
                base = pos * cs
                for i in range(take):
                    prep = preps[j]
                    j += 1
                    if prep is not None:
                        a = base + i * cs
                        b = min(a + cs, base + length)
                        cid, dg, enc, indexed = prep
                        got = store(cid, mv[a:b], dg, enc, indexed)
                        if got.new:
                            new[k] = True
                            stored[k] = got.stored
                            fresh.append((cid, dg, b - a))
                        idbuf[k * ID_SIZE : (k + 1) * ID_SIZE] = cid
                    k += 1
                self.done_chunks += take
            if ahead is not None:
                ahead.release(mv)

        try:
            for no, seg in enumerate(segs):
                if ahead is not None:
                    mv = ahead.next()
                else:
                    mv = self.bufs[no % len(self.bufs)]
                    _read_segment(src, cs, size, seg, mv)
                views: list[memoryview] = []
                for c0, take, pos in seg:
                    length = min(take * cs, size - c0 * cs)
                    base = pos * cs
                    for i in range(take):
                        a = base + i * cs
                        views.append(mv[a : min(a + cs, base + length)])
                share = -(-len(views) // self.threads)  # one task per thread: few hand-offs
                futs = [ex.submit(self._prepare_many, views[g : g + share])
                        for g in range(0, len(views), share)]
                pending.append((seg, mv, futs))
                if len(pending) > 1:
                    finish()
            while pending:
                finish()
        finally:
            for _seg, _mv, futs in pending:  # a failure: let no thread touch a buffer
                for f in futs:
                    f.cancel()
                for f in futs:
                    with contextlib.suppress(BaseException):
                        f.result()
            if ahead is not None:
                ahead.stop()
        ids = np.frombuffer(idbuf, dtype=np.uint8).reshape(n, ID_SIZE)
        return BatchResult(
            item.disk, chunks, ids, new, stored, bytes_read, self.writer.take_written(), fresh
        )


def _drop_frames(e: BaseException) -> None:
    """Forget the reader's frames in ``e``'s traceback chain: they hold slices of its
    segment buffers, and a traceback kept until interpreter exit (the CLI's error path)
    made the exit print "BufferError: memoryview has 1 exported buffer" after the one
    error line. The raise in ``run`` starts a fresh traceback there."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        x.__traceback__ = None
        stack += [x.__context__, x.__cause__]
