"""``ChunkIndex``: the repository's id -> (pack, offset, lengths, digest) table in memory.

Loaded from every index file (``index/*``) into sorted numpy arrays: 86 bytes per
entry (a 70-byte row plus 16 bytes of contiguous sort keys; docs/FORMAT.md). Several
entries may share an id (duplicates of racing writers, repairs); ``candidates``
returns them all, copies listed as damaged last.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from snapferry.engine.errors import CorruptionError, RepositoryError
from snapferry.engine.store.backend import Backend
from snapferry.engine.store.blobs import ENTRY_DTYPE
from snapferry.engine.store.pack import decode_index_file

TABLE_DTYPE = np.dtype(
    [
        ("hi", "<u8"),
        ("lo", "<u8"),
        ("pack", "<u4"),
        ("offset", "<u4"),
        ("stored_len", "<u4"),
        ("raw_len", "<u4"),
        ("crc", "<u4"),
        ("type", "u1"),
        ("codec", "u1"),
        ("digest", "V32"),
    ]
)
BYTES_PER_ENTRY = TABLE_DTYPE.itemsize  # 70; plus 16 bytes of sort keys kept beside
_ID_BE = np.dtype(">u8")


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,16) uint8 or V16 ids -> (hi, lo) uint64 keys (big-endian halves)."""
    raw = np.ascontiguousarray(ids).view(np.uint8).reshape(-1, 16)
    halves = raw.view(_ID_BE).reshape(-1, 2)
    return halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)


def id_key(cid: bytes) -> tuple[int, int]:
    return int.from_bytes(cid[:8], "big"), int.from_bytes(cid[8:], "big")


@dataclass(frozen=True, slots=True)
class Location:
    pack: str
    offset: int
    stored_len: int
    raw_len: int
    codec: int
    btype: int
    crc: int
    digest: bytes
    damaged: bool = False


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    bad_files: list[tuple[str, str]] = field(default_factory=list)


class ChunkIndex:
    """Sorted table of every index entry (see the module doc)."""

    def __init__(self) -> None:
        self.packs: list[bytes] = []
        self._pack_no: dict[bytes, int] = {}
        self.table = np.zeros(0, dtype=TABLE_DTYPE)
        self._hi = np.zeros(0, dtype=np.uint64)
        self._lo = np.zeros(0, dtype=np.uint64)
        self._pending: list[np.ndarray] = []
        self.damaged: set[tuple[int, int]] = set()  # (pack no, offset)
        self._damaged_raw: set[tuple[bytes, int]] = set()
        self.files: set[str] = set()

    # -- building ---------------------------------------------------------------------
    def _pack_number(self, pid: bytes) -> int:
        n = self._pack_no.get(pid)
        if n is None:
            n = self._pack_no[pid] = len(self.packs)
            self.packs.append(pid)
        return n

    def add_group(self, pid: bytes, entries: np.ndarray) -> None:
        """Add the entries (``ENTRY_DTYPE``) of one pack."""
        if entries.dtype != ENTRY_DTYPE:
            entries = np.frombuffer(entries.tobytes(), dtype=ENTRY_DTYPE)
        n = len(entries)
        if not n:
            return
        rows = np.empty(n, dtype=TABLE_DTYPE)
        hi, lo = split_ids(entries["id"])
        rows["hi"], rows["lo"] = hi, lo
        rows["pack"] = self._pack_number(pid)
        for f in ("offset", "stored_len", "raw_len", "crc", "type", "codec"):
            rows[f] = entries[f]
        rows["digest"] = entries["digest"]
        self._pending.append(rows)
        for p, off in list(self._damaged_raw):
            if p == pid:
                self.damaged.add((self._pack_no[pid], off))

    def _settle(self) -> None:
        if not self._pending:
            return
        t = np.concatenate([self.table, *self._pending])
        self._pending.clear()
        order = np.lexsort((t["lo"], t["hi"]))
        self.table = t[order]
        self._hi = np.ascontiguousarray(self.table["hi"])
        self._lo = np.ascontiguousarray(self.table["lo"])

    def load(
        self, backend: Backend, *, skip: Iterable[str] = (), types: tuple[int, ...] | None = None
    ) -> LoadReport:
        """Add every index file of ``backend`` not loaded yet (and not in ``skip``), and
        the damaged copies. Torn or altered index files are reported, never used.
        ``types`` keeps only blobs of those types (the backup's parent needs only pages)."""
        rep = LoadReport()
        skipped = set(skip)
        for info in backend.objects("damaged"):
            self._load_damaged(backend, info.name)
        for info in backend.objects("index"):
            if info.name in self.files or info.name in skipped:
                continue
            try:
                groups = decode_index_file(info.name, backend.load("index", info.name))
            except CorruptionError as e:
                rep.bad_files.append((info.name, str(e)))
                continue
            for pid, entries in groups:
                if types is not None:
                    entries = entries[np.isin(entries["type"], types)]
                self.add_group(pid, entries)
            self.files.add(info.name)
            rep.files.append(info.name)
        self._settle()
        return rep

    def _load_damaged(self, backend: Backend, name: str) -> None:
        try:
            d = json.loads(backend.load("damaged", name))
            for e in d["entries"]:
                pid = bytes.fromhex(e["pack"])
                off = int(e["offset"])
                self._damaged_raw.add((pid, off))
                if pid in self._pack_no:
                    self.damaged.add((self._pack_no[pid], off))
        except (ValueError, KeyError, TypeError, RepositoryError):
            return  # an unreadable damaged list protects nothing; verify reports it

    # -- lookups ----------------------------------------------------------------------
    def __len__(self) -> int:
        self._settle()
        return len(self.table)

    def _range(self, cid: bytes) -> tuple[int, int]:
        self._settle()
        hi, lo = id_key(cid)
        h = self._hi
        a = int(np.searchsorted(h, np.uint64(hi), "left"))
        if a >= len(h) or int(h[a]) != hi:
            return a, a
        b = int(np.searchsorted(h, np.uint64(hi), "right"))
        los = self._lo
        while a < b and int(los[a]) != lo:
            a += 1
        e = a
        while e < b and int(los[e]) == lo:
            e += 1
        return a, e

    def candidates(self, cid: bytes) -> list[Location]:
        """Every copy of ``cid``: undamaged ones first."""
        a, b = self._range(cid)
        out = [self._loc(self.table[i]) for i in range(a, b)]
        out.sort(key=lambda loc: loc.damaged)
        return out

    def _loc(self, row: np.void) -> Location:
        pno = int(row["pack"])
        off = int(row["offset"])
        return Location(
            self.packs[pno].hex(), off, int(row["stored_len"]), int(row["raw_len"]),
            int(row["codec"]), int(row["type"]), int(row["crc"]), bytes(row["digest"]),
            (pno, off) in self.damaged,
        )

    def lookup_valid(self, cid: bytes, digest: bytes, raw_len: int) -> bool:
        """The dedup decision (rule W4): True when an undamaged copy with this digest and
        length exists; False when none does. ``CorruptionError`` when the id names
        other data (a collision: never alias)."""
        a, b = self._range(cid)
        found = False
        for i in range(a, b):
            row = self.table[i]
            if bytes(row["digest"]) != digest or int(row["raw_len"]) != raw_len:
                raise CorruptionError(
                    f"chunk id {cid.hex()} already names different data (hash collision/"
                    "alias): refusing to deduplicate; the backup was not committed"
                )
            if (int(row["pack"]), int(row["offset"])) not in self.damaged:
                found = True
        return found

    def contains(self, cid: bytes) -> bool:
        a, b = self._range(cid)
        return b > a

    def ids(self) -> Iterator[bytes]:
        """Distinct ids, sorted."""
        self._settle()
        t = self.table
        if not len(t):
            return
        keys = np.empty((len(t), 2), dtype=_ID_BE)
        keys[:, 0], keys[:, 1] = t["hi"], t["lo"]
        raw = keys.view(np.uint8).reshape(-1, 16)
        prev = None
        for i in range(len(t)):
            b = raw[i].tobytes()
            if b != prev:
                yield b
                prev = b

    def nbytes(self) -> int:
        """Memory of the table: 70 bytes per entry plus 16 of contiguous sort keys."""
        self._settle()
        return int(self.table.nbytes + self._hi.nbytes + self._lo.nbytes)

    def pack_names(self) -> set[str]:
        return {p.hex() for p in self.packs}

    def rows_of_pack(self, pack: str) -> np.ndarray:
        self._settle()
        pno = self._pack_no.get(bytes.fromhex(pack))
        if pno is None:
            return self.table[:0]
        return self.table[self.table["pack"] == pno]

    def locations_for(self, ids: np.ndarray) -> np.ndarray:
        """Vectorised lookup of ids ((n,16) uint8): the table row of an undamaged copy
        of each, or -1 when there is none."""
        self._settle()
        hi, lo = split_ids(ids)
        h, los = self._hi, self._lo
        a = np.searchsorted(h, hi, "left")
        b = np.searchsorted(h, hi, "right")
        out = np.full(len(hi), -1, dtype=np.int64)
        one = (b - a) == 1
        ai = np.minimum(a, max(len(h) - 1, 0))
        if len(h):
            hit = one & (los[ai] == lo)
            out[hit] = a[hit]
        for k in np.flatnonzero((b - a) > 1).tolist():
            for i in range(int(a[k]), int(b[k])):
                if los[i] == lo[k]:
                    out[k] = i
                    break
        if self.damaged:
            for k in np.flatnonzero(out >= 0).tolist():
                i = int(out[k])
                row = self.table[i]
                if (int(row["pack"]), int(row["offset"])) in self.damaged:
                    out[k] = -1
                    for j in range(int(a[k]), int(b[k])):
                        r = self.table[j]
                        if los[j] == lo[k] and (int(r["pack"]), int(r["offset"])) not in (
                            self.damaged
                        ):
                            out[k] = j
                            break
        return out

    def location_at(self, row: int) -> Location:
        self._settle()
        return self._loc(self.table[row])
