"""``RestorePointSource``: one disk of a restore point, read at random from the repository.

Every restore point's index is complete, so any byte of the disk is one index lookup
and one chunk decode away; no chain is walked. This is the read path under
``snapferry serve`` (NBD), instant boot, live restore and file-level restore.

Reads go through a small cache of decoded chunks (keyed by chunk id, so a chunk used at
many offsets is decoded once) with read-ahead for sequential readers::

    request [off, off+len)      chunks touched: i0 .. i1        (zero chunk: memset)
    sequential (off == last end, within a chunk)?  -> prefetch the next chunks
    cache miss on a chunk another thread is decoding -> wait for that decode

Zero chunks (``NULL_ID``) are holes: ``extents()`` reports them ``zero=True``, reads
fill zeros without touching the store. A corrupt or missing chunk raises
``CorruptionError`` naming the chunk number, offset and id; it is never cached, so a
later read retries (and fails the same way) and nothing else is affected.

The repository is reached through two small protocols: ``IdPages`` (the paged disk
index of format 2, ``DiskIndex``: only the pages a read touches are loaded, kept in a
small LRU) and ``ChunkReader`` (``Repository.reader()``: chunk index lookup, pack
range read, zstd, id check).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from snapferry.engine.errors import CorruptionError, RepositoryError, SourceError
from snapferry.engine.source import Extent

DEFAULT_CACHE_BYTES = 32 << 20
DEFAULT_READAHEAD_BYTES = 4 << 20
_PREFETCH_THREADS = 2
_ZEROS = memoryview(bytes(4 << 20))


class ChunkReader(Protocol):
    """Decoded, checked chunk data by id (the repository's read side)."""

    def read(self, cid: bytes) -> bytes | memoryview: ...


class IdPages(Protocol):
    """The chunk ids of one disk, by page (``snapferry.engine.store.index.DiskIndex``)."""

    virtual_size: int
    chunk_size: int
    page_entries: int

    def __len__(self) -> int: ...

    @property
    def page_count(self) -> int: ...

    def page(self, p: int, *, keep: bool = False) -> np.ndarray | None: ...


@dataclass(frozen=True, slots=True)
class RestorePointSpec:
    """Picklable recipe: open the same restore-point disk again."""

    repo: str
    backup_id: str
    disk: str

    def open(self) -> RestorePointSource:
        return RestorePointSource.open(self.repo, self.backup_id, self.disk)



_Page = tuple[np.ndarray, np.ndarray]  # (ids (n, 16) uint8, nonzero mask (n,) bool)


class RestorePointSource:
    """A read-only ``DiskSource`` whose data is one disk of one restore point.

    Thread-safe: ``readinto`` may be called from many threads at once (the NBD server
    runs connections in parallel); they share the chunk cache and the page cache.
    Memory: at most ``cache_bytes`` of decoded chunks plus ``PAGE_CACHE`` index pages.
    """

    PAGE_CACHE = 64

    def __init__(
        self,
        index: IdPages,
        reader: ChunkReader,
        *,
        name: str = "restore point",
        spec: RestorePointSpec | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
    ) -> None:
        self._index = index
        self._pe = index.page_entries
        self._n = len(index)
        self._size = index.virtual_size
        self._cs = index.chunk_size
        self._reader = reader
        self._name = name
        self._spec = spec
        self._pages: OrderedDict[int, _Page | None] = OrderedDict()
        self._cache: OrderedDict[bytes, bytes | memoryview] = OrderedDict()
        self._cache_max = max(2, cache_bytes // self._cs)
        self._inflight: dict[bytes, Future[bytes | memoryview]] = {}
        self._lock = threading.Lock()
        self._page_lock = threading.Lock()
        self._readahead = max(0, readahead_bytes // self._cs)
        self._last_end = -1
        self._prefetched_to = 0
        self._pool: ThreadPoolExecutor | None = None
        self.chunk_reads = 0  # chunks decoded (for tests and figures)
        self.cache_hits = 0  # chunks found decoded or being decoded
        self.foreground_loads = 0  # chunks a read had to decode itself

    @classmethod
    def open(
        cls,
        repo: Any,
        backup_id: str,
        disk: str | None = None,
        **kw: Any,
    ) -> RestorePointSource:
        """Open disk ``disk`` (or the only disk) of restore point ``backup_id`` in
        ``repo`` (a ``Repository`` or its path). One ``ChunkReader`` (the repository's
        chunk index) serves both the index pages and the data."""
        from snapferry.engine.restore import pick_disk
        from snapferry.engine.store.repo import Repository

        if not isinstance(repo, Repository):
            repo = Repository.open(repo)
        manifest = repo.load_manifest(backup_id)
        name = pick_disk(manifest, disk)
        reader = repo.reader()
        index = repo.load_index(backup_id, name, manifest, reader=reader)
        spec = RestorePointSpec(str(repo.path), backup_id, name)
        return cls(index, reader, name=f"restore point {backup_id}, disk {name}", spec=spec,
                   **kw)

    def __repr__(self) -> str:
        return f"RestorePointSource({self._name!r})"

    # -- index pages --------------------------------------------------------------------
    def _page(self, p: int) -> _Page | None:
        """Page ``p`` as (ids, nonzero mask), or None for a null page (all zeros)."""
        with self._page_lock:
            if p in self._pages:
                self._pages.move_to_end(p)
                return self._pages[p]
        try:
            arr = self._index.page(p)
        except RepositoryError as e:
            raise CorruptionError(f"{self._name}: index page {p} is unreadable: {e}") from None
        got: _Page | None = None if arr is None else (arr, np.asarray(arr.any(axis=1)))
        with self._page_lock:
            self._pages[p] = got
            while len(self._pages) > self.PAGE_CACHE:
                self._pages.popitem(last=False)
        return got

    def _cid(self, i: int) -> bytes | None:
        """The id of chunk ``i``, or None for a zero chunk."""
        pg = self._page(i // self._pe)
        if pg is None:
            return None
        k = i % self._pe
        return pg[0][k].tobytes() if pg[1][k] else None

    # -- DiskSource ------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def chunk_size(self) -> int:
        return self._cs

    def extents(
        self, offset: int = 0, length: int | None = None, *, dirty: bool = False
    ) -> Iterator[Extent]:
        """Runs of data chunks (``zero=False``) and zero chunks (``zero=True``)."""
        if dirty:
            raise SourceError(
                f"{self._name} is a restore point: it has no changed-block tracking"
            )
        end = self._size if length is None else min(self._size, offset + length)
        if offset < 0 or offset > end:
            raise SourceError(f"extent query {offset}+{length} outside {self._name}")
        if end == offset:
            return
        cs = self._cs
        first, last = offset // cs, (end - 1) // cs
        run_start, run_zero = offset, None
        for p in range(first // self._pe, last // self._pe + 1):
            a = max(first, p * self._pe)
            b = min(last + 1, (p + 1) * self._pe)
            pg = self._page(p)
            if pg is None:
                kinds = np.zeros(b - a, dtype=bool)
            else:
                kinds = pg[1][a - p * self._pe : b - p * self._pe]
            change = np.flatnonzero(kinds[1:] != kinds[:-1]) + 1
            for s_, kind in zip(np.concatenate(([0], change)).tolist(),
                                kinds[np.concatenate(([0], change))].tolist(), strict=True):
                zero = not kind
                if run_zero is None:
                    run_zero = zero
                elif zero != run_zero:
                    lo_ = max(offset, (a + s_) * cs)
                    yield Extent(run_start, lo_ - run_start, zero=run_zero, dirty=False)
                    run_start, run_zero = lo_, zero
        yield Extent(run_start, end - run_start, zero=bool(run_zero), dirty=False)

    def readinto(self, buf: memoryview, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        total = mv.nbytes
        if offset < 0 or offset + total > self._size:
            raise SourceError(
                f"read of {total} bytes at {offset} is outside {self._name} "
                f"({self._size} bytes)"
            )
        if total == 0:
            return
        cs = self._cs
        first, last = offset // cs, (offset + total - 1) // cs
        self._maybe_prefetch(offset, total, last)
        pos = 0
        for i in range(first, last + 1):
            c_off = i * cs
            lo = max(offset, c_off) - c_off
            hi = min(offset + total, c_off + cs) - c_off
            n = hi - lo
            cid = self._cid(i)
            if cid is None:
                mv[pos : pos + n] = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
            else:
                data = self._chunk(i, cid)
                mv[pos : pos + n] = memoryview(data)[lo:hi]
            pos += n

    def spec(self) -> RestorePointSpec:
        if self._spec is None:
            raise SourceError(f"{self._name} was not opened from a repository path")
        return self._spec

    def clone(self) -> RestorePointSource:
        return self.spec().open()

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "restore-point", "name": self._name, "size": self._size}
        if self._spec is not None:
            d.update(repo=self._spec.repo, backup_id=self._spec.backup_id, disk=self._spec.disk)
        return d

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=False)
        with self._lock:
            self._cache.clear()

    def __enter__(self) -> RestorePointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- chunks, cache, read-ahead -----------------------------------------------------
    def _load(self, i: int, cid: bytes) -> bytes | memoryview:
        cs = self._cs
        want = min(cs, self._size - i * cs)
        try:
            data = self._reader.read(cid)
        except RepositoryError as e:
            raise CorruptionError(
                f"{self._name}: chunk #{i} (offset {i * cs}, id {cid.hex()}) is unreadable: {e}"
            ) from None
        got = memoryview(data).nbytes
        if got < want or (got > want and got != cs):
            raise CorruptionError(
                f"{self._name}: chunk #{i} (offset {i * cs}, id {cid.hex()}) is "
                f"{got} bytes, expected {want}"
            )
        self.chunk_reads += 1
        return data

    def _chunk(self, i: int, cid: bytes) -> bytes | memoryview:
        with self._lock:
            hit = self._cache.get(cid)
            if hit is not None:
                self._cache.move_to_end(cid)
                self.cache_hits += 1
                return hit
            fut = self._inflight.get(cid)
            owner = fut is None
            if fut is None:
                fut = self._inflight[cid] = Future()
                self.foreground_loads += 1
            else:
                self.cache_hits += 1  # being decoded (read-ahead or another reader)
        if not owner:
            return fut.result()
        return self._fill(i, cid, fut)

    def _fill(self, i: int, cid: bytes, fut: Future[bytes | memoryview]) -> bytes | memoryview:
        """Decode chunk ``i`` into ``fut`` (registered in ``_inflight`` by the caller)."""
        try:
            data = self._load(i, cid)
        except BaseException as e:
            with self._lock:
                self._inflight.pop(cid, None)
            fut.set_exception(e)
            raise
        with self._lock:
            self._inflight.pop(cid, None)
            self._cache[cid] = data
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        fut.set_result(data)
        return data

    def _maybe_prefetch(self, offset: int, total: int, last: int) -> None:
        """Sequential reader (this read starts where the previous one ended, give or
        take a chunk: several connections interleave): decode the next chunks now.
        Their futures are registered at once, so a reader that needs one of them
        waits for it instead of decoding it a second time."""
        if not self._readahead:
            return
        cs = self._cs
        jobs: list[tuple[int, bytes, Future[bytes | memoryview]]] = []
        with self._lock:
            sequential = self._last_end >= 0 and abs(offset - self._last_end) <= cs
            self._last_end = offset + total
            if not sequential:
                self._prefetched_to = last + 1
                return
            start = max(last + 1, self._prefetched_to)
            stop = min(self._n, last + 1 + self._readahead)
            if start >= stop:
                return
            self._prefetched_to = stop
        for j in range(start, stop):
            cid = self._cid(j)
            if cid is None:
                continue
            with self._lock:
                if cid in self._cache or cid in self._inflight:
                    continue
                fut: Future[bytes | memoryview] = Future()
                self._inflight[cid] = fut
                jobs.append((j, cid, fut))
        with self._lock:
            if jobs and self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=_PREFETCH_THREADS, thread_name_prefix="readahead"
                )
            pool = self._pool
        for j, cid, fut in jobs:
            assert pool is not None
            pool.submit(self._prefetch_one, j, cid, fut)

    def _prefetch_one(self, i: int, cid: bytes, fut: Future[bytes | memoryview]) -> None:
        try:
            self._fill(i, cid, fut)
        except Exception:
            pass  # a bad chunk is reported by the read that needs it


def open_restore_point(
    repo: Any, backup_id: str, disk: str | None = None, **kw: Any
) -> RestorePointSource:
    """``RestorePointSource.open`` (a function for callers that hold a path)."""
    if isinstance(repo, (str, Path)):
        from snapferry.engine.store.repo import Repository

        repo = Repository.open(repo)
    return RestorePointSource.open(repo, backup_id, disk, **kw)


def copy_to_fd(
    src: Any,
    fd: int,
    *,
    workers: int = 2,
    block: int = 4 << 20,
    advance: Any = None,
    wrote: Any = None,
) -> int:
    """Copy every data extent of the ``DiskSource`` ``src`` into the file ``fd`` at the
    same offsets (zero extents are skipped: the caller's file is sparse there).

    Blocks of ``block`` bytes (aligned to it) are read and ``pwrite``-n by ``workers``
    threads, a bounded number in flight; ``advance(n)`` and ``wrote(n)`` are called in
    the calling thread after each block. Returns the bytes written."""
    from collections import deque

    def ranges() -> Iterator[tuple[int, int]]:
        for e in src.extents():
            if e.zero:
                continue
            off = e.offset
            while off < e.end:
                n = min(e.end, (off // block + 1) * block) - off
                yield off, n
                off += n

    def one(off: int, n: int) -> int:
        buf = bytearray(n)
        mv = memoryview(buf)
        src.readinto(mv, off)
        while mv:
            k = os.pwrite(fd, mv, off)
            mv = mv[k:]
            off += k
        return n

    total = 0

    def done(n: int) -> None:
        nonlocal total
        total += n
        if advance is not None:
            advance(n)
        if wrote is not None:
            wrote(n)

    if workers <= 1:
        for off, n in ranges():
            done(one(off, n))
        return total
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="copy") as pool:
        pending: deque[Future[int]] = deque()
        try:
            for off, n in ranges():
                pending.append(pool.submit(one, off, n))
                if len(pending) >= 2 * workers:
                    done(pending.popleft().result())
            while pending:
                done(pending.popleft().result())
        finally:
            for f in pending:
                f.cancel()
    return total
