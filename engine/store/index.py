"""``DiskIndex``: the complete chunk-id list of one disk in one restore point.

Binary file ``<disk>.idx`` (big-endian header, 64 bytes), see docs/FORMAT.md::

    0   4  magic         b"SFIX"
    4   2  version       1
    6   2  flags         0
    8   8  virtual_size  bytes
    16  4  chunk_size    bytes
    20  8  count         number of 16-byte rows = ceil(virtual_size / chunk_size)
    28 32  body_digest   BLAKE3-256 of the body
    60  4  header_crc    CRC-32 of bytes 0..59
    64     body          count x 16-byte chunk ids (NULL_ID = all-zero chunk)
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from snapferry.engine.errors import CorruptionError
from snapferry.engine.store.hashing import ID_SIZE, NULL_ID, strong_digest

MAGIC = b"SFIX"
VERSION = 1
_HDR = struct.Struct(">4sHHQIQ32s")
_CRC = struct.Struct(">I")
HEADER_SIZE = _HDR.size + _CRC.size  # 64
_ID_DTYPE = np.dtype((np.void, ID_SIZE))
IdSet = set[bytes]


def chunk_count(virtual_size: int, chunk_size: int) -> int:
    return -(-virtual_size // chunk_size)


class DiskIndex:
    """Chunk ids of one disk as an ``(n_chunks, 16)`` uint8 array."""

    __slots__ = ("chunk_size", "ids", "virtual_size")

    def __init__(self, virtual_size: int, chunk_size: int, ids: np.ndarray) -> None:
        if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != ID_SIZE:
            raise ValueError("ids must be an (n, 16) uint8 array")
        if ids.shape[0] != chunk_count(virtual_size, chunk_size):
            raise ValueError(
                f"{ids.shape[0]} ids for {virtual_size} bytes in {chunk_size}-byte chunks"
            )
        self.virtual_size = virtual_size
        self.chunk_size = chunk_size
        self.ids = np.ascontiguousarray(ids)

    @classmethod
    def empty(cls, virtual_size: int, chunk_size: int) -> DiskIndex:
        """All chunks NULL_ID (a disk of zeros)."""
        n = chunk_count(virtual_size, chunk_size)
        return cls(virtual_size, chunk_size, np.zeros((n, ID_SIZE), dtype=np.uint8))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DiskIndex):
            return NotImplemented
        return (
            self.virtual_size == other.virtual_size
            and self.chunk_size == other.chunk_size
            and bool(np.array_equal(self.ids, other.ids))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"DiskIndex(virtual_size={self.virtual_size}, chunk_size={self.chunk_size}, "
            f"chunks={len(self)}, nonzero={self.nonzero_count()})"
        )

    def copy(self) -> DiskIndex:
        return DiskIndex(self.virtual_size, self.chunk_size, self.ids.copy())

    def resized(self, virtual_size: int) -> DiskIndex:
        """A copy for a disk of ``virtual_size`` bytes: extended with NULL_ID when it grew,
        truncated when it shrank (the start of an incremental's index).

        When the size is not a multiple of the chunk size and differs from the old
        size, the last chunk's extent changed: the caller must re-read it."""
        n = chunk_count(virtual_size, self.chunk_size)
        ids = np.zeros((n, ID_SIZE), dtype=np.uint8)
        keep = min(n, len(self))
        ids[:keep] = self.ids[:keep]
        return DiskIndex(virtual_size, self.chunk_size, ids)

    def set(self, i: int, cid: bytes) -> None:
        self.ids[i] = np.frombuffer(cid, dtype=np.uint8)

    def get(self, i: int) -> bytes:
        return self.ids[i].tobytes()

    def set_many(self, indices: np.ndarray | list[int], cids: np.ndarray | list[bytes]) -> None:
        """Vectorised ``set``: ``cids`` is an (k, 16) uint8 array or a list of ids."""
        if isinstance(cids, list):
            arr = np.frombuffer(b"".join(cids), dtype=np.uint8).reshape(-1, ID_SIZE)
        else:
            arr = cids
        self.ids[np.asarray(indices, dtype=np.int64)] = arr

    def offset(self, i: int) -> int:
        return i * self.chunk_size

    def length(self, i: int) -> int:
        """Bytes covered by chunk ``i`` (the last one may be short)."""
        return min(self.chunk_size, self.virtual_size - i * self.chunk_size)

    def nonzero_mask(self) -> np.ndarray:
        return np.asarray(self.ids.any(axis=1))

    def nonzero_count(self) -> int:
        return int(np.count_nonzero(self.nonzero_mask()))

    def zero_count(self) -> int:
        return len(self) - self.nonzero_count()

    def unique_ids(self) -> IdSet:
        """Distinct non-null ids referenced by this index."""
        if not len(self):
            return set()
        u = np.unique(self.ids.view(_ID_DTYPE).ravel())
        out = {bytes(x) for x in u.tolist()}
        out.discard(NULL_ID)
        return out

    # -- file I/O ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        body = self.ids.tobytes()
        hdr = _HDR.pack(
            MAGIC, VERSION, 0, self.virtual_size, self.chunk_size, len(self), strong_digest(body)
        )
        return b"".join((hdr, _CRC.pack(zlib.crc32(hdr)), body))

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "index") -> DiskIndex:
        if len(data) < HEADER_SIZE:
            raise CorruptionError(f"{name}: too short for an index header")
        magic, version, _flags, vsize, csize, count, digest = _HDR.unpack_from(data, 0)
        (crc,) = _CRC.unpack_from(data, _HDR.size)
        if magic != MAGIC:
            raise CorruptionError(f"{name}: not a snapferry disk index (bad magic)")
        if zlib.crc32(data[: _HDR.size]) != crc:
            raise CorruptionError(f"{name}: index header checksum mismatch")
        if version != VERSION:
            raise CorruptionError(f"{name}: index version {version} not supported")
        if csize <= 0 or count != chunk_count(vsize, csize):
            raise CorruptionError(f"{name}: index header is inconsistent")
        body = memoryview(data)[HEADER_SIZE:]
        if len(body) != count * ID_SIZE:
            raise CorruptionError(
                f"{name}: index body is {len(body)} bytes, expected {count * ID_SIZE}"
            )
        if strong_digest(body) != digest:
            raise CorruptionError(f"{name}: index body checksum mismatch")
        ids = np.frombuffer(body, dtype=np.uint8).reshape(count, ID_SIZE).copy()
        return cls(vsize, csize, ids)

    def save(self, path: Path | str) -> None:
        """Write to ``path`` (fsynced). Callers wanting atomicity write a temp name and
        rename (``Repository.commit_restore_point`` does)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            mv = memoryview(self.to_bytes())
            while mv:
                mv = mv[os.write(fd, mv) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: Path | str) -> DiskIndex:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise CorruptionError(f"index file {path} is missing") from None
        return cls.from_bytes(data, name=str(path))
