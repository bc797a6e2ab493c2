"""Blobs and their 72-byte entries (docs/FORMAT.md, *Chunk ids and blobs*).

A blob is the stored form of a chunk or a disk-index page: raw, or one zstd frame.
An entry says where a blob is and what it must decode to.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zstandard

from snapferry.engine.errors import CorruptionError
from snapferry.engine.store.hashing import chunk_id, strong_digest

CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = (CODEC_RAW, CODEC_ZSTD)
TYPE_CHUNK = 0
TYPE_PAGE = 1
TYPES = (TYPE_CHUNK, TYPE_PAGE)
MAX_BLOB = 1 << 30


def _table(values: tuple[int, ...]) -> np.ndarray:
    t = np.zeros(256, dtype=bool)
    t[list(values)] = True
    return t


# codec byte -> known (low nibble a codec, high nibble 0 = plain or 1 = AES-GCM); type
# byte -> known. A table lookup per entry: np.isin cost 0.4 ms per index file to load.
_KNOWN_CODEC = _table(tuple(c | e << 4 for c in CODECS for e in (0, 1)))
_KNOWN_TYPE = _table(TYPES)

ENTRY = struct.Struct(">16sBBHQIII32s")
ENTRY_SIZE = ENTRY.size  # 72
ENTRY_DTYPE = np.dtype(
    [
        ("id", "V16"),
        ("type", "u1"),
        ("codec", "u1"),
        ("flags", ">u2"),
        ("offset", ">u8"),
        ("stored_len", ">u4"),
        ("raw_len", ">u4"),
        ("crc", ">u4"),
        ("digest", "V32"),
    ]
)
assert ENTRY_DTYPE.itemsize == ENTRY_SIZE


@dataclass(frozen=True, slots=True)
class Entry:
    id: bytes
    type: int
    codec: int
    offset: int
    stored_len: int
    raw_len: int
    crc: int
    digest: bytes

    def pack(self) -> bytes:
        return ENTRY.pack(
            self.id, self.type, self.codec, 0, self.offset, self.stored_len, self.raw_len,
            self.crc, self.digest,
        )


def parse_entries(buf: bytes | memoryview, count: int, *, what: str) -> np.ndarray:
    """``count`` entries from ``buf`` as an ``ENTRY_DTYPE`` array, sanity-checked."""
    if len(buf) != count * ENTRY_SIZE:
        raise CorruptionError(f"{what}: entry table has the wrong size")
    arr = np.frombuffer(buf, dtype=ENTRY_DTYPE, count=count)
    if count:
        codec, enc = arr["codec"] & 0x0F, arr["codec"] >> 4  # bits 4..7: encryption
        if not _KNOWN_CODEC[arr["codec"]].all() or not _KNOWN_TYPE[arr["type"]].all():
            raise CorruptionError(f"{what}: unknown blob codec or type")
        if (arr["stored_len"] > MAX_BLOB).any() or (arr["raw_len"] > MAX_BLOB).any():
            raise CorruptionError(f"{what}: blob lengths out of range")
        raw = codec == CODEC_RAW
        sealed_raw = arr["raw_len"][raw].astype(np.int64) + 28 * enc[raw]  # AEAD overhead
        if (arr["stored_len"][raw] != sealed_raw).any():
            raise CorruptionError(f"{what}: raw blob whose stored length differs")
    return arr


_local = threading.local()


def compressor(level: int) -> zstandard.ZstdCompressor:
    """A ZstdCompressor for ``level``, cached per thread (they are not thread-safe)."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(
            level=level, write_checksum=False, write_content_size=True
        )
    return c


def decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def encode(
    data: bytes | memoryview, *, level: int, cctx: zstandard.ZstdCompressor | None = None
) -> tuple[int, bytes | memoryview]:
    """(codec, stored bytes): zstd when it shrinks the data, else the data itself."""
    raw_len = memoryview(data).nbytes
    comp = (cctx or compressor(level)).compress(data)
    if len(comp) < raw_len:
        return CODEC_ZSTD, comp
    return CODEC_RAW, data


def decode(
    codec: int, stored: bytes | memoryview, raw_len: int,
    dctx: zstandard.ZstdDecompressor | None = None,
) -> bytes | memoryview:
    """The raw bytes of a blob (no digest check). Raises ``CorruptionError``."""
    if codec == CODEC_ZSTD:
        try:
            data: bytes | memoryview = (dctx or decompressor()).decompress(
                stored, max_output_size=raw_len
            )
        except zstandard.ZstdError as e:
            raise CorruptionError(f"blob does not decompress: {e}") from None
    elif codec == CODEC_RAW:
        data = stored
    else:
        raise CorruptionError(f"unknown blob codec {codec}")
    if memoryview(data).nbytes != raw_len:
        raise CorruptionError(f"blob decodes to {memoryview(data).nbytes} bytes, not {raw_len}")
    return data


def crc32(stored: bytes | memoryview) -> int:
    return zlib.crc32(stored)


def check_blob(
    stored: bytes | memoryview,
    *,
    cid: bytes,
    codec: int,
    raw_len: int,
    seed: int,
    crc: int | None = None,
    digest: bytes | None = None,
    digest_fn: Callable[[bytes | memoryview], bytes] = strong_digest,
    unseal: Callable[[bytes | memoryview], bytes | memoryview] | None = None,
) -> bytes | memoryview:
    """Decode a blob and prove it: XXH3-128 of the raw bytes = ``cid`` (the reader's
    check); with ``crc``/``digest`` also the CRC of the stored bytes and the BLAKE3
    (verify's full check). Returns the raw bytes; raises ``CorruptionError``."""
    if crc is not None and zlib.crc32(stored) != crc:
        raise CorruptionError(f"blob {cid.hex()}: CRC mismatch")
    if unseal is not None:  # encryption: the CRC is of the sealed bytes
        stored = unseal(stored)
    data = decode(codec & 0x0F, stored, raw_len)
    if chunk_id(seed, data) != cid:
        raise CorruptionError(f"blob {cid.hex()} holds data with another id")
    if digest is not None and digest_fn(data) != digest:
        raise CorruptionError(f"blob {cid.hex()}: BLAKE3 digest mismatch")
    return data
