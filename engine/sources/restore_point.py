"""``RestorePointSource``: one disk of a restore point, read from the repository.

Every restore point's index is complete, so any byte of the disk is one index lookup
and one chunk decode away; no chain is walked. This is the one read path of restore
points: ``restore`` (``copy_to``), ``snapferry serve`` (NBD), instant boot, live
restore and file-level restore all read through it.

How a read is served (``readinto``, random or sequential)::

    chunks i0..i1 of the request -> their ids (index pages, LRU)    zero chunk: memset
    ids not decoded yet -> one vectorised lookup in the chunk index
        -> grouped by pack, in offset order, adjacent blobs joined into runs
        -> one ranged load per run; unseal, zstd, keyed-id check per blob
    sequential reader (up to ``STREAMS`` interleaved streams: NBD multi-conn)
        -> the next windows are read ahead by the thread pool

Decoded chunks sit in a cache keyed by chunk id (a chunk used at many offsets is
decoded once), bounded in bytes; a chunk another thread is decoding is waited for,
never decoded twice. ``copy_to`` (restore) walks the disk a window of index pages at a
time, reads every distinct chunk of the window once in pack order through the same
runs, and writes it at every offset that uses it (no cache: each is needed once).

Memory: ``cache_bytes`` of decoded chunks, ``readahead_bytes`` per stream in flight,
``PAGE_CACHE`` index pages; nothing grows with the disk's virtual size.

Zero chunks (``NULL_ID``) are holes: ``extents()`` reports them ``zero=True``, reads
fill zeros without touching the store. A corrupt or missing chunk raises
``CorruptionError`` naming the chunk number, offset and id; it is never cached, so a
later read retries (and fails the same way) and nothing else is affected.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from snapferry.engine.errors import CorruptionError, RepositoryError, SourceError
from snapferry.engine.source import Extent
from snapferry.engine.store.chunks import Scratch

if TYPE_CHECKING:
    from snapferry.engine.store.chunks import ChunkReader, Decoded, Run
    from snapferry.engine.store.repo import Repository

DEFAULT_CACHE_BYTES = 64 << 20
DEFAULT_READAHEAD_BYTES = 8 << 20
STREAMS = 8
"""Sequential streams followed at once (nbdcopy's connections each read their own)."""
TASK_BYTES = 2 << 20
"""Raw bytes decoded by one pool task (two threads share a read-ahead window)."""
COPY_TASK_BYTES = 8 << 20
"""Raw bytes of one ``copy_to`` task, and of each thread's write buffer: disk-adjacent
chunks of a task go out in one write (restore of the issue-sized image, 8 threads:
1.6 MiB per write on average and 3.8-4.0 s, against 1.1 MiB and 4.3 s with 2 MiB)."""
COPY_WINDOW_PAGES = 16
"""Index pages ``copy_to`` plans at once: a chunk used in two windows is read twice."""
DISK_ORDER = True
"""``copy_to`` writes a window's runs in disk order (False: pack order)."""
_IN_FLIGHT_PER_WORKER = 2
_ZEROS = memoryview(bytes(4 << 20))


def default_threads() -> int:
    return max(2, min(os.cpu_count() or 1, 4))


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
_Result = dict[bytes, "Decoded"]


class _Stream:
    __slots__ = ("end", "fetched")

    def __init__(self, end: int, fetched: int) -> None:
        self.end = end  # byte offset where the stream's last read ended
        self.fetched = fetched  # chunks before this one are read or being read ahead


@dataclass(slots=True)
class CopyResult:
    unique_chunks: int  # distinct chunks decoded (per window)
    bytes_written: int
    direct: bool = False  # written with O_DIRECT to the end


class RestorePointSource:
    """A read-only ``DiskSource`` whose data is one disk of one restore point.

    Thread-safe: ``readinto`` may be called from many threads at once (the NBD server
    runs connections in parallel); they share the chunk cache and the page cache.
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
        threads: int = 0,
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
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached = 0
        self._cache_max = max(2 * self._cs, cache_bytes)
        self._inflight: dict[bytes, Future[_Result]] = {}
        self._lock = threading.Lock()
        self._page_lock = threading.Lock()
        self._readahead = max(0, readahead_bytes // self._cs)
        self._streams: deque[_Stream] = deque()
        self._threads = threads if threads > 0 else default_threads()
        self._task_chunks = max(1, TASK_BYTES // self._cs)
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._local = threading.local()  # per-thread decode buffers
        self.chunk_reads = 0  # chunks decoded (for tests and figures)
        self.cache_hits = 0  # chunks found decoded or being decoded
        self.foreground_loads = 0  # chunks a read had to decode itself

    @classmethod
    def open(
        cls,
        repo: Repository | str | Path,
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

    def _ids(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, nonzero mask) of chunks ``[a, b)``."""
        pe = self._pe
        if a // pe == (b - 1) // pe:  # one page: views, no copy
            p = a // pe
            pg = self._page(p)
            if pg is None:
                return np.zeros((b - a, 16), dtype=np.uint8), np.zeros(b - a, dtype=bool)
            return pg[0][a - p * pe : b - p * pe], pg[1][a - p * pe : b - p * pe]
        ids = np.zeros((b - a, 16), dtype=np.uint8)
        nz = np.zeros(b - a, dtype=bool)
        for p in range(a // pe, (b - 1) // pe + 1):
            lo, hi = max(a, p * pe), min(b, (p + 1) * pe)
            pg = self._page(p)
            if pg is not None:
                ids[lo - a : hi - a] = pg[0][lo - p * pe : hi - p * pe]
                nz[lo - a : hi - a] = pg[1][lo - p * pe : hi - p * pe]
        return ids, nz

    # -- DiskSource ------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def chunk_size(self) -> int:
        return self._cs

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded chunks held in the cache now (at most ``cache_bytes``)."""
        return self._cached

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
        ids, nz = self._ids(first, last + 1)
        self._follow(offset, total, last)
        got: dict[bytes, bytes | memoryview] = {}
        if nz.any():
            # fast path: every chunk already decoded (a sequential reader behind its
            # read-ahead); else the full path (claims, waits, decodes)
            cids = [ids[k].tobytes() for k in np.flatnonzero(nz).tolist()]
            with self._lock:
                cache = self._cache
                for cid in cids:
                    hit = cache.get(cid)
                    if hit is None:
                        break
                    cache.move_to_end(cid)
                    got[cid] = hit
                else:
                    self.cache_hits += len(got)
            if len(got) < len(set(cids)):
                got = self._get(first, ids, nz)
        pos = 0
        for k, i in enumerate(range(first, last + 1)):
            c_off = i * cs
            lo = max(offset, c_off) - c_off
            hi = min(offset + total, c_off + cs) - c_off
            n = hi - lo
            if not nz[k]:
                mv[pos : pos + n] = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
            else:
                mv[pos : pos + n] = memoryview(got[ids[k].tobytes()])[lo:hi]
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
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._cache.clear()
            self._cached = 0
            for fut in self._inflight.values():  # cancelled read-ahead: nobody waits
                if not fut.done():
                    fut.cancel()
            self._inflight.clear()

    def __enter__(self) -> RestorePointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decoding through runs ----------------------------------------------------------
    def _decode(self, cids: list[bytes], uids: np.ndarray) -> Iterator[tuple[Run, list[Decoded]]]:
        """Read ``cids`` (ids also as the (k, 16) array ``uids``) run by run."""
        reader = self._reader
        rows = reader.rows_for(uids)
        sc = getattr(self._local, "scratch", None)
        if sc is None:
            sc = self._local.scratch = Scratch(self._cs)
        for run in reader.plan_runs(rows):
            yield run, list(reader.iter_run(run, [cids[j] for j in run.items], sc, own=True))
        for j in np.flatnonzero(rows < 0).tolist():  # no usable copy in the index
            yield _missing_run(j), [_read_one(reader, cids[j])]

    def _check_len(self, i: int, cid: bytes, data: Decoded) -> Decoded:
        if isinstance(data, CorruptionError):
            return data
        want = min(self._cs, self._size - i * self._cs)
        got = memoryview(data).nbytes
        if got < want or (got > want and got != self._cs):
            return CorruptionError(f"is {got} bytes, expected {want}")
        return data

    def _fetch(self, cids: list[bytes], uids: np.ndarray, first_use: dict[bytes, int],
               fut: Future[_Result]) -> _Result:
        """Decode ``cids`` into the cache and ``fut`` (registered in ``_inflight``)."""
        out: _Result = {}
        try:
            for run, datas in self._decode(cids, uids):
                for j, data in zip(run.items, datas, strict=True):
                    cid = cids[j]
                    d = self._check_len(first_use[cid], cid, data)
                    if isinstance(d, memoryview):  # a slice of the run's buffer: own it
                        d = bytes(d)
                    out[cid] = d
        except BaseException as e:
            with self._lock:
                for cid in cids:
                    self._inflight.pop(cid, None)
            fut.set_exception(e)
            raise
        with self._lock:
            for cid in cids:
                self._inflight.pop(cid, None)
                got = out.get(cid)
                if not isinstance(got, bytes):
                    continue  # a bad chunk is never cached
                self.chunk_reads += 1
                if cid not in self._cache:
                    self._cache[cid] = got
                    self._cached += len(got)
            while self._cached > self._cache_max and len(self._cache) > 1:
                _k, old = self._cache.popitem(last=False)
                self._cached -= len(old)
        fut.set_result(out)
        return out

    def _claim(self, first: int, ids: np.ndarray, nz: np.ndarray, *, foreground: bool
               ) -> tuple[_Result, list[Future[_Result]], list[bytes], np.ndarray,
                          dict[bytes, int], Future[_Result] | None]:
        """Split the nonzero chunks of ``ids`` (chunk ``first`` on) into: decoded
        (cache hits), being decoded (futures) and claimed here (a new future)."""
        where = np.flatnonzero(nz)
        rows = np.ascontiguousarray(ids[where])
        keys = rows.view(np.dtype((np.void, 16))).ravel()
        uniq, idx = np.unique(keys, return_index=True)
        hits: _Result = {}
        waits: list[Future[_Result]] = []
        mine: list[bytes] = []
        mine_rows: list[int] = []
        first_use: dict[bytes, int] = {}
        fut: Future[_Result] | None = None
        with self._lock:
            for u, k in zip(uniq.tolist(), idx.tolist(), strict=True):
                cid = bytes(u)
                hit = self._cache.get(cid)
                if hit is not None:
                    self._cache.move_to_end(cid)
                    if foreground:
                        self.cache_hits += 1
                        hits[cid] = hit
                    continue
                other = self._inflight.get(cid)
                if other is not None:
                    if foreground:
                        self.cache_hits += 1
                        waits.append(other)
                    continue
                mine.append(cid)
                mine_rows.append(k)
                first_use[cid] = first + int(where[k])
            if mine:
                fut = Future()
                for cid in mine:
                    self._inflight[cid] = fut
                if foreground:
                    self.foreground_loads += len(mine)
        return hits, waits, mine, rows[mine_rows], first_use, fut

    def _get(self, first: int, ids: np.ndarray, nz: np.ndarray
             ) -> dict[bytes, bytes | memoryview]:
        """Decoded data of every nonzero chunk of ``ids``; raises ``CorruptionError``."""
        hits, waits, mine, uids, first_use, fut = self._claim(first, ids, nz, foreground=True)
        out: _Result = dict(hits)
        if fut is not None:
            out.update(self._fetch(mine, uids, first_use, fut))
        for w in waits:
            out.update(w.result())
        # only the ids asked for; report the first bad one (by chunk number)
        ok: dict[bytes, bytes | memoryview] = {}
        for k in np.flatnonzero(nz).tolist():
            cid = ids[k].tobytes()
            d = out.get(cid)
            if isinstance(d, CorruptionError):
                i = first + k
                raise CorruptionError(
                    f"{self._name}: chunk #{i} (offset {i * self._cs}, id {cid.hex()}) is "
                    f"unreadable: {d}"
                )
            if d is None:  # a waited-for decode dropped it (closed): decode it here
                return self._get_again(first, ids, nz)
            ok[cid] = d
        return ok

    def _get_again(self, first: int, ids: np.ndarray, nz: np.ndarray
                   ) -> dict[bytes, bytes | memoryview]:
        if self._closed:
            raise SourceError(f"{self._name} is closed")
        return self._get(first, ids, nz)

    # -- read-ahead -----------------------------------------------------------------------
    def _follow(self, offset: int, total: int, last: int) -> None:
        """Sequential reader (this read starts where one of the last ``STREAMS`` reads
        ended, give or take a chunk): read ahead of it. A stream's first read does not."""
        if not self._readahead:
            return
        cs = self._cs
        end = offset + total
        with self._lock:
            s = next((s for s in self._streams if abs(offset - s.end) <= cs), None)
            if s is None:
                if len(self._streams) >= STREAMS:
                    self._streams.popleft()
                self._streams.append(_Stream(end, last + 1))
                return
            self._streams.remove(s)
            self._streams.append(s)
            s.end = end
            start = max(s.fetched, last + 1)
            target = min(self._n, last + 1 + self._readahead)
            # top up in halves of the read-ahead: fewer, bigger tasks
            if start >= target or (s.fetched > last + 1 and
                                   s.fetched - (last + 1) > self._readahead // 2):
                return
            s.fetched = target
            if self._closed:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._threads,
                                                thread_name_prefix="readahead")
            pool = self._pool
        step = self._task_chunks
        for a in range(start, target, step):
            # claimed here, before the task runs: a read that needs one of these chunks
            # waits for it instead of decoding it a second time
            try:
                ids, nz = self._ids(a, min(target, a + step))
            except CorruptionError:
                return  # reported by the read that needs that page
            if not nz.any():
                continue
            _h, _w, mine, uids, first_use, fut = self._claim(a, ids, nz, foreground=False)
            if fut is not None:
                try:
                    pool.submit(self._prefetch, mine, uids, first_use, fut)
                except RuntimeError:  # closed meanwhile
                    self._drop(mine, fut)
                    return

    def _prefetch(self, mine: list[bytes], uids: np.ndarray, first_use: dict[bytes, int],
                  fut: Future[_Result]) -> None:
        try:
            self._fetch(mine, uids, first_use, fut)
        except Exception:
            pass  # a bad chunk is reported by the read that needs it

    def _drop(self, mine: list[bytes], fut: Future[_Result]) -> None:
        with self._lock:
            for cid in mine:
                self._inflight.pop(cid, None)
        fut.set_result({})

    # -- restore: a copy of the whole disk ---------------------------------------------
    def data_windows(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first chunk number, ids) of consecutive non-null pages,
        ``COPY_WINDOW_PAGES`` at most."""
        buf: list[np.ndarray] = []
        start = nxt = -1
        for p in range(self._index.page_count):
            pg = self._page(p) if self._index_has(p) else None
            first = p * self._pe
            if pg is None or (buf and (first != nxt or len(buf) >= COPY_WINDOW_PAGES)):
                if buf:
                    yield start, buf[0] if len(buf) == 1 else np.concatenate(buf)
                    buf = []
                if pg is None:
                    continue
            if not buf:
                start = first
            buf.append(pg[0])
            nxt = first + len(pg[0])
        if buf:
            yield start, buf[0] if len(buf) == 1 else np.concatenate(buf)

    def _index_has(self, p: int) -> bool:
        """False for a null page, known without loading anything."""
        null = getattr(self._index, "is_null_page", None)
        return True if null is None else not null(p)

    def copy_to(
        self,
        fd: int,
        *,
        workers: int = 0,
        advance: Callable[[int], None] | None = None,
        direct_fd: int | None = None,
    ) -> CopyResult:
        """Write every data chunk into ``fd`` at its offset (zero chunks are skipped:
        the caller's file is sparse there, or was zeroed). Each window's distinct
        chunks are read once, in pack order, and written at every offset that uses
        them, by ``workers`` threads; a task's disk-adjacent chunks are decoded side by
        side and written with one call (``engine/direct_write.py``), through ``direct_fd``
        (the same file opened with ``O_DIRECT``) when given. ``advance(n)`` runs in
        the calling thread. Raises ``CorruptionError`` (the first bad chunk met) or
        ``OSError``."""
        from snapferry.engine.direct_write import DirectTarget, TaskBuffer

        nworkers = workers if workers > 0 else min(os.cpu_count() or 1, 8)
        cs, vsize = self._cs, self._size
        target = DirectTarget(fd, direct_fd)
        slots = max(1, COPY_TASK_BYTES // cs)
        reader = self._reader
        unique = 0
        written = 0

        def tasks() -> Iterator[list[tuple[Run, list[bytes], list[np.ndarray]]]]:
            nonlocal unique
            for base, ids in self.data_windows():
                nz = np.flatnonzero(ids.any(axis=1))
                if not nz.size:
                    continue
                keys = np.ascontiguousarray(ids[nz]).view(np.dtype((np.void, 16))).ravel()
                u, first, inverse, counts = np.unique(keys, return_index=True,
                                                      return_inverse=True, return_counts=True)
                unique += len(u)
                positions = nz[np.argsort(inverse.ravel(), kind="stable")] + base
                starts = np.concatenate(([0], np.cumsum(counts)[:-1])).tolist()
                cl = counts.tolist()
                cids = [bytes(x) for x in u.tolist()]
                uids = np.ascontiguousarray(ids[nz[first]])
                rows = reader.rows_for(uids)
                batch: list[tuple[Run, list[bytes], list[np.ndarray]]] = []
                size = 0
                # runs of blobs that also follow one another on the disk: a run of
                # an incremental's pack (changed chunks, far apart) would otherwise
                # make each of them a write of its own, away from its neighbours
                runs = reader.plan_runs(rows, max_blobs=slots, places=nz[first])
                if DISK_ORDER:
                    # runs by where on the disk they land first (u is sorted by id, so
                    # ``first`` is each id's first use): the target is written roughly
                    # front to back, as the packs of a backup were, not in pack-name order
                    at = first.tolist()
                    runs.sort(key=lambda r: min(at[j] for j in r.items))
                runs += [_missing_run(j) for j in np.flatnonzero(rows < 0).tolist()]
                for run in runs:  # a task holds at most ``slots`` chunks
                    if batch and size + len(run.items) > slots:
                        yield batch
                        batch, size = [], 0
                    batch.append((run, [cids[j] for j in run.items],
                                  [positions[starts[j] : starts[j] + cl[j]] for j in run.items]))
                    size += len(run.items)
                if batch:
                    yield batch

        local = threading.local()

        def write(items: list[tuple[Run, list[bytes], list[np.ndarray]]]) -> int:
            sc = getattr(local, "scratch", None)
            if sc is None:
                sc = local.scratch = Scratch(cs)
                local.buf = TaskBuffer(cs, slots)
            buf: TaskBuffer = local.buf
            views = buf.views
            # slots in the order of each chunk's first offset on the disk
            firsts = [int(pos[0]) for _run, _cids, poss in items for pos in poss]
            order = sorted(range(len(firsts)), key=firsts.__getitem__)
            slot_of = [0] * len(firsts)
            for rank, i in enumerate(order):
                slot_of[i] = rank
            filled = [False] * len(firsts)
            extra: list[tuple[int, int]] = []
            n = 0
            i = -1
            for run, cids, poss in items:
                datas = (reader.iter_run(run, cids, sc) if run.pack >= 0
                         else iter([_read_one(reader, cids[0])]))
                for cid, pos in zip(cids, poss, strict=True):
                    i += 1
                    at = pos.tolist()
                    slot = sc.raw = views[slot_of[i]]  # the decoder writes the chunk there
                    data = next(datas)
                    if isinstance(data, CorruptionError):
                        raise CorruptionError(
                            f"{self._name}: chunk #{at[0]} (offset {at[0] * cs}, id "
                            f"{cid.hex()}) is unreadable: {data}"
                        )
                    mv = memoryview(data)
                    have = mv.nbytes
                    for p in at:
                        off = p * cs
                        want = min(cs, vsize - off)
                        if have != want and not (have > want and off + cs >= vsize):
                            raise CorruptionError(
                                f"{self._name}: chunk #{p} (offset {off}, id {cid.hex()}) "
                                f"is {have} bytes, expected {want}"
                            )
                    if have == cs and at[0] * cs + cs <= vsize:
                        if not buf.holds(mv):
                            slot[:] = mv  # not decoded in place (a raw blob, a retry)
                        filled[slot_of[i]] = True
                        for p in at[1:]:  # the chunk's other offsets: from its slot too
                            if p * cs + cs <= vsize:
                                extra.append((p, slot_of[i]))
                                n += cs
                            else:  # the disk's last, partial chunk (a shrunk disk's)
                                target.write(slot[: vsize - p * cs], p * cs)
                                n += vsize - p * cs
                        n += cs
                        continue
                    for p in at:  # the disk's last, partial chunk
                        off = p * cs
                        want = min(cs, vsize - off)
                        target.write(mv[:want], off)
                        n += want
            buf.write_out(target, sorted(firsts), filled, extra)
            return n

        def done(n: int) -> None:
            nonlocal written
            written += n
            if advance is not None:
                advance(n)

        if nworkers <= 1:
            for t in tasks():
                done(write(t))
            return CopyResult(unique, written, target.is_direct)
        with ThreadPoolExecutor(max_workers=nworkers, thread_name_prefix="restore") as pool:
            pending: deque[Future[int]] = deque()
            limit = nworkers * _IN_FLIGHT_PER_WORKER
            try:
                for t in tasks():
                    pending.append(pool.submit(write, t))
                    if len(pending) >= limit:
                        done(pending.popleft().result())
                while pending:
                    done(pending.popleft().result())
            finally:
                for f in pending:
                    f.cancel()
        return CopyResult(unique, written, target.is_direct)


def _missing_run(j: int) -> Run:
    """A stand-in run for a chunk with no usable copy in the index (read one by one)."""
    from snapferry.engine.store.chunks import Run

    return Run(-1, 0, 0, [-1], [j])


def _read_one(reader: ChunkReader, cid: bytes) -> Decoded:
    try:
        return reader.read(cid)
    except CorruptionError as e:
        return e
    except RepositoryError as e:
        return CorruptionError(str(e))


def open_restore_point(
    repo: Repository | str | Path, backup_id: str, disk: str | None = None, **kw: Any
) -> RestorePointSource:
    """``RestorePointSource.open`` (a function for callers that hold a path)."""
    return RestorePointSource.open(repo, backup_id, disk, **kw)
