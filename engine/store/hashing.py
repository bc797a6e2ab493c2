"""Chunk identity: keyed XXH3-128 ids, BLAKE3 strong digests and the zero check."""

from __future__ import annotations

import blake3
import xxhash

NULL_ID: bytes = bytes(16)
"""The id of an all-zero chunk. Zero chunks are never stored; restore leaves holes."""

ID_SIZE = 16
DIGEST_SIZE = 32

_zero_cache: dict[int, bytes] = {}


def chunk_id(seed: int, data: bytes | memoryview) -> bytes:
    """16-byte keyed XXH3-128 of ``data`` (big-endian digest as xxhash gives it).

    The seed is the repository's random 64-bit seed. A crafted collision is still
    possible (XXH3 is not collision resistant), which is why every dedup hit also
    compares the BLAKE3 digest stored in the chunk header.
    """
    return xxhash.xxh3_128_digest(data, seed)


def strong_digest(data: bytes | memoryview) -> bytes:
    """32-byte BLAKE3 of ``data`` (single-threaded: workers are already parallel)."""
    return blake3.blake3(data).digest()


def _zeros(n: int) -> bytes:
    z = _zero_cache.get(n)
    if z is None:
        if len(_zero_cache) > 8:
            _zero_cache.clear()
        z = bytes(n)
        _zero_cache[n] = z
    return z


def is_zero(data: bytes | memoryview) -> bool:
    """True when every byte of ``data`` is zero (memcmp against a cached zero buffer)."""
    if isinstance(data, bytes):
        return data == _zeros(len(data))
    mv = memoryview(data)
    n = mv.nbytes
    if n == 0:
        return True
    # bytes.startswith takes any buffer and memcmp()s it; memoryview == bytes would
    # compare element by element (~50x slower).
    return _zeros(n).startswith(mv)
