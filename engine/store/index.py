"""``DiskIndex``: the chunk ids of one disk in one restore point, held as pages.

A disk of ``n`` chunks has ``ceil(n / page_entries)`` pages of ``page_entries`` ids
(docs/FORMAT.md, *Disk-index page*). In memory a page is either *absent* (a null page:
all zero; or a stored page not loaded, known by its id) or *loaded* (an
``(entries, 16)`` uint8 array). Only pages that are read or written are loaded, so the
memory of a sparse 16 TiB disk holding little data stays small.

The old flat API stays (``get``, ``set``, ``set_many``, ``nonzero_mask``, ``ids``,
``unique_ids``, ``resized``): ``ids`` and ``nonzero_mask`` build whole-disk arrays and
are meant for small disks and tests; the pipeline uses the page API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from snapferry.engine.store.hashing import ID_SIZE, NULL_ID

PAGE_ENTRIES = 4096
_ID_DTYPE = np.dtype((np.void, ID_SIZE))
IdSet = set[bytes]
PageLoader = Callable[[bytes, int], np.ndarray]
"""(page id, number of entries) -> the page's (entries, 16) uint8 array."""


def chunk_count(virtual_size: int, chunk_size: int) -> int:
    return -(-virtual_size // chunk_size)


def _no_loader(pid: bytes, n: int) -> np.ndarray:
    raise RuntimeError(f"page {pid.hex()} is not loaded and no loader was given")


class DiskIndex:
    """Chunk ids of one disk, paged (see the module doc)."""

    __slots__ = (
        "_loaded", "_loader", "_page_zero", "base_zero", "chunk_size", "dirty", "page_entries",
        "page_ids", "virtual_size",
    )

    def __init__(
        self,
        virtual_size: int,
        chunk_size: int,
        ids: np.ndarray | None = None,
        *,
        page_entries: int = PAGE_ENTRIES,
        page_ids: list[bytes | None] | None = None,
        loader: PageLoader | None = None,
        base_zero: int | None = None,
    ) -> None:
        self.virtual_size = virtual_size
        self.chunk_size = chunk_size
        self.page_entries = page_entries
        n = chunk_count(virtual_size, chunk_size)
        npages = -(-n // page_entries)
        self._loader: PageLoader = loader or _no_loader
        self._loaded: dict[int, np.ndarray] = {}
        self._page_zero: dict[int, int] = {}  # zero count of a page as first loaded
        self.dirty: set[int] = set()
        self.base_zero = base_zero
        if page_ids is not None:
            if len(page_ids) != npages:
                raise ValueError(f"{len(page_ids)} page ids for {npages} pages")
            self.page_ids = list(page_ids)
        else:
            self.page_ids = [None] * npages
        if ids is not None:
            if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != ID_SIZE:
                raise ValueError("ids must be an (n, 16) uint8 array")
            if ids.shape[0] != n:
                raise ValueError(f"{ids.shape[0]} ids for {virtual_size} bytes in "
                                 f"{chunk_size}-byte chunks")
            self.base_zero = None
            for p in range(npages):
                a = p * page_entries
                page = np.ascontiguousarray(ids[a : a + page_entries])
                if page.any():
                    self._loaded[p] = page.copy()
                self.page_ids[p] = None
                self.dirty.add(p)

    @classmethod
    def empty(cls, virtual_size: int, chunk_size: int, *, page_entries: int = PAGE_ENTRIES
              ) -> DiskIndex:
        """All chunks NULL_ID (a disk of zeros); a full backup starts from it."""
        idx = cls(virtual_size, chunk_size, page_entries=page_entries)
        idx.base_zero = len(idx)
        return idx

    # -- sizes ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return chunk_count(self.virtual_size, self.chunk_size)

    @property
    def page_count(self) -> int:
        return len(self.page_ids)

    def page_len(self, p: int) -> int:
        return min(self.page_entries, len(self) - p * self.page_entries)

    def offset(self, i: int) -> int:
        return i * self.chunk_size

    def length(self, i: int) -> int:
        """Bytes covered by chunk ``i`` (the last one may be short)."""
        return min(self.chunk_size, self.virtual_size - i * self.chunk_size)

    # -- pages ----------------------------------------------------------------------------
    def is_null_page(self, p: int) -> bool:
        return p not in self._loaded and self.page_ids[p] is None

    def page(self, p: int, *, keep: bool = False) -> np.ndarray | None:
        """Page ``p``'s ids, or None for a null page. ``keep=False`` does not cache a page
        loaded for reading (streaming: restore, verify)."""
        arr = self._loaded.get(p)
        if arr is not None:
            return arr
        pid = self.page_ids[p]
        if pid is None:
            return None
        arr = self._loader(pid, self.page_len(p))
        if keep:
            self._loaded[p] = arr
            self._page_zero[p] = int(np.count_nonzero(~arr.any(axis=1)))
        return arr

    def _writable(self, p: int) -> np.ndarray:
        arr = self._loaded.get(p)
        if arr is None:
            if self.page_ids[p] is None:
                arr = np.zeros((self.page_len(p), ID_SIZE), dtype=np.uint8)
                self._loaded[p] = arr
                self._page_zero[p] = self.page_len(p)
            else:
                got = self.page(p, keep=True)
                assert got is not None
                arr = got
                if not arr.flags.writeable:
                    arr = self._loaded[p] = arr.copy()
        self.dirty.add(p)
        return arr

    def iter_pages(self) -> Iterator[tuple[int, np.ndarray | None]]:
        """(page number, ids or None for a null page), streaming."""
        for p in range(self.page_count):
            yield p, self.page(p)

    def loaded_pages(self) -> int:
        return len(self._loaded)

    def nbytes(self) -> int:
        """Bytes of id arrays held in memory now."""
        return sum(a.nbytes for a in self._loaded.values())

    def drop_clean(self) -> None:
        """Forget loaded pages that were not changed (they can be reloaded)."""
        for p in [p for p in self._loaded if p not in self.dirty and self.page_ids[p] is not None]:
            del self._loaded[p]

    # -- entries --------------------------------------------------------------------------
    def get(self, i: int) -> bytes:
        p, k = divmod(i, self.page_entries)
        arr = self.page(p)
        return NULL_ID if arr is None else arr[k].tobytes()

    def set(self, i: int, cid: bytes) -> None:
        p, k = divmod(i, self.page_entries)
        self._writable(p)[k] = np.frombuffer(cid, dtype=np.uint8)

    def set_many(self, indices: np.ndarray | list[int], cids: np.ndarray | list[bytes]) -> None:
        """Vectorised ``set``: ``cids`` is an (k, 16) uint8 array or a list of ids."""
        if isinstance(cids, list):
            arr = np.frombuffer(b"".join(cids), dtype=np.uint8).reshape(-1, ID_SIZE)
        else:
            arr = cids
        idx = np.asarray(indices, dtype=np.int64)
        if not len(idx):
            return
        pages = idx // self.page_entries
        order = np.argsort(pages, kind="stable")
        pages, idx, arr = pages[order], idx[order], arr[order]
        bounds = np.flatnonzero(np.diff(pages)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [len(idx)]))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            p = int(pages[a])
            self._writable(p)[idx[a:b] - p * self.page_entries] = arr[a:b]

    def copy(self) -> DiskIndex:
        out = DiskIndex(self.virtual_size, self.chunk_size, page_entries=self.page_entries,
                        page_ids=list(self.page_ids), loader=self._loader,
                        base_zero=self.base_zero)
        out._loaded = {p: a.copy() for p, a in self._loaded.items()}
        out._page_zero = dict(self._page_zero)
        out.dirty = set(self.dirty)
        return out

    def resized(self, virtual_size: int) -> DiskIndex:
        """A copy for a disk of ``virtual_size`` bytes: extended with NULL_ID when it grew,
        truncated when it shrank (the start of an incremental's index). Pages that
        change length are loaded and marked dirty; the rest keep their ids.

        When the size is not a multiple of the chunk size and differs from the old
        size, the last chunk's extent changed: the caller must re-read it."""
        out = DiskIndex(virtual_size, self.chunk_size, page_entries=self.page_entries,
                        loader=self._loader)
        keep = min(len(out), len(self))
        for p in range(out.page_count):
            a = p * self.page_entries
            if a >= keep:
                break
            n = out.page_len(p)
            if p < self.page_count and n == self.page_len(p) and a + n <= keep:
                out.page_ids[p] = self.page_ids[p]
                if p in self._loaded:
                    out._loaded[p] = self._loaded[p].copy()
                    if p in self.dirty:
                        out.dirty.add(p)
                continue
            src = self.page(p)
            dst = out._writable(p)
            if src is not None:
                m = min(keep - a, n, len(src))
                dst[:m] = src[:m]
        out.base_zero = None
        return out

    # -- whole-disk views (small disks, tests, compatibility) ----------------------------
    @property
    def ids(self) -> np.ndarray:
        """The whole (n, 16) id array (memory grows with the disk: use pages instead)."""
        out = np.zeros((len(self), ID_SIZE), dtype=np.uint8)
        for p, arr in self.iter_pages():
            if arr is not None:
                a = p * self.page_entries
                out[a : a + len(arr)] = arr
        return out

    def nonzero_mask(self) -> np.ndarray:
        out = np.zeros(len(self), dtype=bool)
        for p, arr in self.iter_pages():
            if arr is not None:
                a = p * self.page_entries
                out[a : a + len(arr)] = arr.any(axis=1)
        return out

    def nonzero_count(self) -> int:
        return len(self) - self.zero_count()

    def zero_count(self) -> int:
        """Zero entries. With ``base_zero`` known (the parent's count, or a fresh
        index), only the pages loaded since are looked at."""
        if self.base_zero is not None:
            z = self.base_zero
            for p, arr in self._loaded.items():
                z += int(np.count_nonzero(~arr.any(axis=1))) - self._page_zero.get(p, 0)
            return z
        z = 0
        for p, page in self.iter_pages():
            z += self.page_len(p) if page is None else int(np.count_nonzero(~page.any(axis=1)))
        return z

    def unique_ids(self) -> IdSet:
        """Distinct non-null ids referenced by this index."""
        out: IdSet = set()
        for _p, arr in self.iter_pages():
            if arr is not None:
                u = np.unique(np.ascontiguousarray(arr).view(_ID_DTYPE).ravel())
                out.update(bytes(x) for x in u.tolist())
        out.discard(NULL_ID)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DiskIndex):
            return NotImplemented
        if (self.virtual_size, self.chunk_size, self.page_entries) != (
            other.virtual_size, other.chunk_size, other.page_entries
        ):
            return False
        for p in range(self.page_count):
            a, b = self.page(p), other.page(p)
            if a is None or b is None:
                if (a is not None and a.any()) or (b is not None and b.any()):
                    return False
            elif not np.array_equal(a, b):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"DiskIndex(virtual_size={self.virtual_size}, chunk_size={self.chunk_size}, "
            f"chunks={len(self)}, pages={self.page_count}, loaded={len(self._loaded)})"
        )
