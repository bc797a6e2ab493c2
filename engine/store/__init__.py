"""The chunk store: repository layout, chunk format, indexes and manifests.

Public API (see docs/FORMAT.md for the on-disk format)::

    from snapferry.engine.store import Repository, DiskIndex, Manifest, DiskEntry, LocalChunkStore
    from snapferry.engine.store.hashing import chunk_id, strong_digest, is_zero, NULL_ID
    from snapferry.engine.store.chunkfmt import encode_chunk, decode_chunk, parse_header
"""

from snapferry.engine.store.base import ChunkStore
from snapferry.engine.store.chunkfmt import HEADER_SIZE, ChunkHeader, decode_chunk, encode_chunk
from snapferry.engine.store.hashing import NULL_ID, chunk_id, is_zero, strong_digest
from snapferry.engine.store.index import DiskIndex
from snapferry.engine.store.local import LocalChunkStore
from snapferry.engine.store.manifest import DiskEntry, Manifest
from snapferry.engine.store.repo import DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL, Repository

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_ZSTD_LEVEL",
    "HEADER_SIZE",
    "NULL_ID",
    "ChunkHeader",
    "ChunkStore",
    "DiskEntry",
    "DiskIndex",
    "LocalChunkStore",
    "Manifest",
    "Repository",
    "chunk_id",
    "decode_chunk",
    "encode_chunk",
    "is_zero",
    "strong_digest",
]
