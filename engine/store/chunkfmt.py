"""The self-describing chunk blob: a fixed 52-byte header followed by the payload.

Layout (all integers big-endian), see docs/FORMAT.md::

    0   4  magic        b"SFCK"
    4   1  version      1
    5   1  codec        0 = raw, 1 = zstd (one frame, content size recorded)
    6   2  flags        0 (reserved)
    8   4  raw_len      length of the raw (decoded) chunk
    12  4  stored_len   length of the payload that follows the header
    16 32  digest       BLAKE3-256 of the raw data
    48  4  crc32        CRC-32 (zlib) of bytes 0..47 followed by the payload
    52     payload
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass

import zstandard

from snapferry.engine.errors import CorruptionError
from snapferry.engine.store.hashing import chunk_id, strong_digest

MAGIC = b"SFCK"
VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = (CODEC_RAW, CODEC_ZSTD)

_PREFIX = struct.Struct(">4sBBHII32s")
_CRC = struct.Struct(">I")
HEADER_SIZE = _PREFIX.size + _CRC.size  # 52
MAX_RAW_LEN = 1 << 30


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    codec: int
    raw_len: int
    stored_len: int
    digest: bytes
    crc: int
    version: int = VERSION


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
    """A ZstdDecompressor cached per thread."""
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def encode_chunk(
    data: bytes | memoryview,
    *,
    level: int,
    cctx: zstandard.ZstdCompressor | None = None,
    digest: bytes | None = None,
) -> bytes:
    """Compress ``data`` (kept raw when zstd does not shrink it) and prefix the header.

    ``digest`` may pass a BLAKE3 already computed by the caller (dedup check).
    """
    raw_len = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
    if digest is None:
        digest = strong_digest(data)
    comp = (cctx or compressor(level)).compress(data)
    payload: bytes | memoryview
    if len(comp) < raw_len:
        codec, payload = CODEC_ZSTD, comp
    else:
        codec, payload = CODEC_RAW, data
    prefix = _PREFIX.pack(MAGIC, VERSION, codec, 0, raw_len, len(payload), digest)
    crc = zlib.crc32(payload, zlib.crc32(prefix))
    return b"".join((prefix, _CRC.pack(crc), payload))


def parse_header(blob_prefix: bytes | memoryview) -> ChunkHeader:
    """Parse and sanity-check the first ``HEADER_SIZE`` bytes of a chunk blob.

    The CRC covers the payload too, so it is only checked by ``decode_chunk``.
    """
    if len(blob_prefix) < HEADER_SIZE:
        raise CorruptionError(
            f"chunk too short for its header ({len(blob_prefix)} < {HEADER_SIZE} bytes)"
        )
    magic, version, codec, _flags, raw_len, stored_len, digest = _PREFIX.unpack_from(
        blob_prefix, 0
    )
    if magic != MAGIC:
        raise CorruptionError(f"chunk has bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise CorruptionError(f"chunk format version {version} is not supported (max {VERSION})")
    if codec not in CODECS:
        raise CorruptionError(f"chunk has unknown codec {codec}")
    if raw_len > MAX_RAW_LEN or stored_len > MAX_RAW_LEN:
        raise CorruptionError(f"chunk lengths out of range ({raw_len}, {stored_len})")
    if codec == CODEC_RAW and stored_len != raw_len:
        raise CorruptionError(f"raw chunk with stored length {stored_len} != {raw_len}")
    (crc,) = _CRC.unpack_from(blob_prefix, _PREFIX.size)
    return ChunkHeader(codec, raw_len, stored_len, bytes(digest), crc, version)


def check_blob(blob: bytes | memoryview) -> ChunkHeader:
    """Check a whole chunk blob without decoding it: header, file size and the CRC over
    header and payload. Cheap (CRC-32 of the stored bytes, no zstd); proves the blob is
    the one the writer produced, so it tells an intact chunk from a torn or damaged one.
    Raises ``CorruptionError``."""
    hdr = parse_header(blob)
    mv = memoryview(blob)
    if len(mv) != HEADER_SIZE + hdr.stored_len:
        raise CorruptionError(
            f"chunk is {len(mv)} bytes, header says {HEADER_SIZE + hdr.stored_len}"
        )
    crc = zlib.crc32(mv[HEADER_SIZE:], zlib.crc32(mv[: _PREFIX.size]))
    if crc != hdr.crc:
        raise CorruptionError("chunk CRC mismatch")
    return hdr


def _payload_data(
    hdr: ChunkHeader, blob: bytes | memoryview, dctx: zstandard.ZstdDecompressor | None
) -> bytes:
    payload = memoryview(blob)[HEADER_SIZE:]
    if hdr.codec == CODEC_ZSTD:
        try:
            data = (dctx or decompressor()).decompress(payload, max_output_size=hdr.raw_len)
        except zstandard.ZstdError as e:
            raise CorruptionError(f"chunk does not decompress: {e}") from None
    else:
        data = payload.tobytes()
    if len(data) != hdr.raw_len:
        raise CorruptionError(f"chunk decodes to {len(data)} bytes, header says {hdr.raw_len}")
    return data


def decode_chunk(
    blob: bytes | memoryview, *, dctx: zstandard.ZstdDecompressor | None = None
) -> bytes:
    """Check and decode a chunk blob; return the raw data. Raises ``CorruptionError``.

    Checks: header, size, CRC, zstd, decoded length and the BLAKE3 digest."""
    hdr = check_blob(blob)
    data = _payload_data(hdr, blob, dctx)
    if strong_digest(data) != hdr.digest:
        raise CorruptionError("chunk BLAKE3 digest mismatch")
    return data


def decode_verified(
    blob: bytes | memoryview,
    cid: bytes,
    seed: int,
    *,
    dctx: zstandard.ZstdDecompressor | None = None,
    strong: bool = True,
) -> bytes:
    """``decode_chunk`` plus a check that the data hashes to ``cid`` under ``seed``.

    ``strong=False`` skips the BLAKE3 re-hash (the costliest check, ~4 GB/s against
    zstd decode ~1.5 GB/s and XXH3 ~40 GB/s): the CRC still proves the stored bytes and
    the keyed XXH3-128 id proves the data is the one the index names. BLAKE3 guards
    dedup hits against crafted XXH3 collisions, which writers check before any reuse,
    so readers that only need the data (restore) may skip it; ``verify`` keeps it.
    """
    data = decode_chunk(blob, dctx=dctx) if strong else _payload_data(check_blob(blob), blob, dctx)
    if chunk_id(seed, data) != cid:
        raise CorruptionError(f"chunk {cid.hex()} holds data with another id")
    return data


def decode_for_read(
    blob: bytes,
    cid: bytes,
    seed: int,
    *,
    dctx: zstandard.ZstdDecompressor | None = None,
) -> bytes | memoryview:
    """The reader's fast path (restore): the raw data of the chunk ``cid``, proven by
    its keyed XXH3-128 id alone.

    A reader that knows the id the data must hash to needs neither the CRC nor the
    BLAKE3: any damage to the stored bytes (payload, codec, lengths) changes the decoded
    data or fails zstd, and a 128-bit keyed hash of the decoded data catches that far
    more surely than CRC-32; BLAKE3 only matters on a writer's dedup hit (crafted XXH3
    collisions), which writers check before reusing a chunk. This skips the two
    costliest checks (CRC-32 ~2.4 GB/s of stored bytes, BLAKE3 ~4 GB/s of raw bytes;
    XXH3 runs at ~40 GB/s). On any failure the blob is re-checked with every check
    (``decode_verified``) so the ``CorruptionError`` names the precise fault (CRC,
    zstd, BLAKE3, id). Raw (codec 0) chunks come back as a memoryview of ``blob``
    (no copy).
    """
    try:
        hdr = parse_header(blob)
        payload = memoryview(blob)[HEADER_SIZE:]
        if len(payload) == hdr.stored_len:
            data: bytes | memoryview
            if hdr.codec == CODEC_ZSTD:
                data = (dctx or decompressor()).decompress(payload, max_output_size=hdr.raw_len)
            else:
                data = payload
            if len(data) == hdr.raw_len and chunk_id(seed, data) == cid:
                return data
    except (CorruptionError, zstandard.ZstdError):
        pass
    try:
        decode_verified(blob, cid, seed, dctx=dctx)  # raises the precise CorruptionError
    except CorruptionError as e:
        msg = str(e)
        raise CorruptionError(msg if cid.hex() in msg else f"chunk {cid.hex()}: {msg}") from None
    raise CorruptionError(f"chunk {cid.hex()} does not decode to its id")  # pragma: no cover
