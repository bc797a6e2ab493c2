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

The repository is reached through ``ChunkReader`` (the one place that knows today's
store API), so the reader object of format v2 plugs in here.
"""

from __future__ import annotations

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

    def read_chunk(self, cid: bytes) -> bytes: ...


class RepoChunkReader:
    """``ChunkReader`` over format v1: ``store.get`` + ``decode_for_read``."""

    def __init__(self, repo: Any) -> None:
        from snapferry.engine.store.chunkfmt import decode_for_read

        self._store = repo.store
        self._seed = repo.seed
        self._decode = decode_for_read

    def read_chunk(self, cid: bytes) -> bytes:
        data = self._decode(self._store.get(cid), cid, self._seed)
        return bytes(data)


@dataclass(frozen=True, slots=True)
class RestorePointSpec:
    """Picklable recipe: open the same restore-point disk again."""

    repo: str
    backup_id: str
    disk: str

    def open(self) -> RestorePointSource:
        return RestorePointSource.open(self.repo, self.backup_id, self.disk)


def pick_disk_name(names: list[str], backup_id: str, disk: str | None) -> str:
    """``disk``, or the only disk of the restore point (``UsageError`` otherwise)."""
    from snapferry.engine.errors import UsageError

    if disk is not None:
        if disk not in names:
            raise UsageError(
                f"restore point {backup_id} has no disk {disk!r} "
                f"(disks: {', '.join(names) or 'none'})"
            )
        return disk
    if len(names) == 1:
        return names[0]
    if not names:
        raise UsageError(f"restore point {backup_id} holds no disks")
    raise UsageError(
        f"restore point {backup_id} holds {len(names)} disks; choose one with --disk "
        f"({', '.join(names)})"
    )


class RestorePointSource:
    """A read-only ``DiskSource`` whose data is one disk of one restore point.

    Thread-safe: ``readinto`` may be called from many threads at once (the NBD server
    runs requests in parallel); they share the cache.
    """

    def __init__(
        self,
        ids: np.ndarray,
        virtual_size: int,
        chunk_size: int,
        reader: ChunkReader,
        *,
        name: str = "restore point",
        spec: RestorePointSpec | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
    ) -> None:
        if ids.ndim != 2 or ids.shape[1] != 16 or ids.dtype != np.uint8:
            raise ValueError("ids must be an (n, 16) uint8 array")
        self._ids = ids
        self._nonzero = np.asarray(ids.any(axis=1))
        self._size = virtual_size
        self._cs = chunk_size
        self._reader = reader
        self._name = name
        self._spec = spec
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_max = max(2, cache_bytes // chunk_size)
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._readahead = max(0, readahead_bytes // chunk_size)
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
        ``repo`` (a ``Repository`` or its path)."""
        from snapferry.engine.store.repo import Repository

        if not isinstance(repo, Repository):
            repo = Repository.open(repo)
        manifest = repo.load_manifest(backup_id)
        name = pick_disk_name(list(manifest.disk_names), backup_id, disk)
        index = repo.load_index(backup_id, name, manifest)
        spec = RestorePointSpec(str(repo.path), backup_id, name)
        return cls(
            index.ids,
            index.virtual_size,
            index.chunk_size,
            RepoChunkReader(repo),
            name=f"restore point {backup_id}, disk {name}",
            spec=spec,
            **kw,
        )

    def __repr__(self) -> str:
        return f"RestorePointSource({self._name!r})"

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
        mask = self._nonzero[first : last + 1]
        # boundaries where the kind changes, as chunk numbers relative to ``first``
        change = np.flatnonzero(mask[1:] != mask[:-1]) + 1
        starts = np.concatenate(([0], change))
        stops = np.concatenate((change, [len(mask)]))
        for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
            lo = max(offset, (first + s) * cs)
            hi = min(end, (first + e) * cs)
            yield Extent(lo, hi - lo, zero=not bool(mask[s]), dirty=False)

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
            if not self._nonzero[i]:
                mv[pos : pos + n] = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
            else:
                data = self._chunk(i)
                mv[pos : pos + n] = memoryview(data)[lo:hi]  # one copy, no slice object
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
    def _load(self, i: int, cid: bytes) -> bytes:
        cs = self._cs
        want = min(cs, self._size - i * cs)
        try:
            data = self._reader.read_chunk(cid)
        except RepositoryError as e:
            raise CorruptionError(
                f"{self._name}: chunk #{i} (offset {i * cs}, id {cid.hex()}) is unreadable: {e}"
            ) from None
        if len(data) < want or (len(data) > want and len(data) != cs):
            raise CorruptionError(
                f"{self._name}: chunk #{i} (offset {i * cs}, id {cid.hex()}) is "
                f"{len(data)} bytes, expected {want}"
            )
        self.chunk_reads += 1
        return data

    def _chunk(self, i: int) -> bytes:
        cid = self._ids[i].tobytes()
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

    def _fill(self, i: int, cid: bytes, fut: Future[bytes]) -> bytes:
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
        jobs: list[tuple[int, bytes, Future[bytes]]] = []
        with self._lock:
            sequential = self._last_end >= 0 and abs(offset - self._last_end) <= cs
            self._last_end = offset + total
            if not sequential:
                self._prefetched_to = last + 1
                return
            start = max(last + 1, self._prefetched_to)
            stop = min(len(self._nonzero), last + 1 + self._readahead)
            if start >= stop:
                return
            self._prefetched_to = stop
            for j in range(start, stop):
                if not self._nonzero[j]:
                    continue
                cid = self._ids[j].tobytes()
                if cid in self._cache or cid in self._inflight:
                    continue
                fut: Future[bytes] = Future()
                self._inflight[cid] = fut
                jobs.append((j, cid, fut))
            if jobs and self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=_PREFETCH_THREADS, thread_name_prefix="readahead"
                )
            pool = self._pool
        for j, cid, fut in jobs:
            assert pool is not None
            pool.submit(self._prefetch_one, j, cid, fut)

    def _prefetch_one(self, i: int, cid: bytes, fut: Future[bytes]) -> None:
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
