"""Packs (``data/<pack id>``) and index files (``index/<digest>``); docs/FORMAT.md.

``PackWriter`` gathers blobs in memory up to the pack size, then saves the pack and,
after it, the index file naming it (rule W3). Both are written once, never changed.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from snapferry.engine.errors import CorruptionError
from snapferry.engine.store.backend import Backend
from snapferry.engine.store.blobs import ENTRY, ENTRY_SIZE, crc32, parse_entries
from snapferry.engine.store.crypto import ENC_AES_GCM, SEAL_OVERHEAD, Sealer, sealer_of
from snapferry.engine.store.hashing import strong_digest

PACK_MAGIC = b"SFPK"
PACK_END = b"SFPE"
INDEX_MAGIC = b"SFIN"
VERSION = 2
PACK_HEADER = struct.Struct(">4sHHII32s")  # 48
PACK_FOOTER = struct.Struct(">II32sI4s")  # 48
INDEX_HEADER = struct.Struct(">4sHHII")  # 16
GROUP = struct.Struct(">32sI")
PACK_HEADER_SIZE = PACK_HEADER.size
PACK_FOOTER_SIZE = PACK_FOOTER.size
assert PACK_HEADER_SIZE == 48 and PACK_FOOTER_SIZE == 48


DigestFn = Callable[[bytes | memoryview], bytes]


def new_pack_id() -> bytes:
    return secrets.token_bytes(32)


@dataclass
class WrittenObjects:
    """Names of the objects one writer saved (for abort and the collision guard)."""

    packs: list[str] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)
    pack_bytes: int = 0
    index_bytes: int = 0
    verified: list[str] = field(default_factory=list)  # packs read back fully once saved

    def extend(self, other: WrittenObjects) -> None:
        self.packs += other.packs
        self.indexes += other.indexes
        self.pack_bytes += other.pack_bytes
        self.index_bytes += other.index_bytes
        self.verified += other.verified


class PackSink(Protocol):
    """Where a finished pack goes instead of a save in the caller's thread
    (``engine/store/saver.py``)."""

    def submit(self, job: FinishedPack) -> None: ...


@dataclass
class FinishedPack:
    """A pack ready to save and the index file naming it."""

    name: str
    data: bytes | bytearray
    index_name: str
    index_blob: bytes


def save_finished(backend: Backend, job: FinishedPack, out: WrittenObjects) -> None:
    """Pack first, then its index file (rule W3); each recorded in ``out`` once saved."""
    backend.save("data", job.name, job.data)
    out.packs.append(job.name)
    out.pack_bytes += len(job.data)
    backend.save("index", job.index_name, job.index_blob)
    out.indexes.append(job.index_name)
    out.index_bytes += len(job.index_blob)


class PackWriter:
    """Appends blobs to an in-memory pack; ``flush`` saves pack then index file (or hands
    both to ``sink``, which saves them in that order)."""

    def __init__(self, backend: Backend, target_size: int, key_id: int = 0,
                 sink: PackSink | None = None) -> None:
        self.backend = backend
        self.sink = sink
        self.target = target_size
        self.sealer = sealer_of(backend)
        self.key_id = key_id or self.sealer.key_id
        self.written = WrittenObjects()
        self._start()

    def _start(self) -> None:
        self.pack_id = new_pack_id()
        self.buf = bytearray(PACK_HEADER.pack(PACK_MAGIC, VERSION, 0, self.key_id, 0, self.pack_id))
        self.entries: list[bytes] = []

    @property
    def pending(self) -> int:
        return len(self.entries)

    def add(
        self, cid: bytes, btype: int, codec: int, stored: bytes | memoryview, raw_len: int,
        digest: bytes,
    ) -> tuple[bytes, int, bytes]:
        """Append a blob; returns (pack id, offset, its 72-byte entry). May flush first."""
        n = memoryview(stored).nbytes
        if self.entries and len(self.buf) + n > self.target:
            self.flush()
        off = len(self.buf)
        if self.sealer.encrypted:  # docs/FORMAT.md, *Encryption*
            stored = self.sealer.seal_blob(stored, pack=self.pack_id, offset=off, btype=btype,
                                           cid=cid)
            n, codec = len(stored), codec | ENC_AES_GCM << 4
        self.buf += stored
        entry = ENTRY.pack(cid, btype, codec, 0, off, n, raw_len, crc32(stored), digest)
        self.entries.append(entry)
        return self.pack_id, off, entry

    def flush(self) -> WrittenObjects:
        """Save the pending pack and its index file; returns what this call wrote (with a
        ``sink``: nothing, the sink reports what it saves)."""
        out = WrittenObjects()
        if not self.entries:
            return out
        trailer = b"".join(self.entries)
        header = bytes(self.buf[:PACK_HEADER_SIZE])
        name = self.pack_id.hex()
        if isinstance(self.sealer, Sealer):
            self.buf += self.sealer.seal_trailer(header, trailer)
            self.buf += struct.pack(">II", len(self.entries), len(trailer) + SEAL_OVERHEAD)
            self.buf += self.sealer.pack_tag(name, self.buf) + struct.pack(">I4s", 0, PACK_END)
        else:
            footer = PACK_FOOTER.pack(
                len(self.entries), len(trailer), strong_digest(header + trailer), 0, PACK_END
            )
            self.buf += trailer
            self.buf += footer
        iname, blob = encode_index_file([(self.pack_id, trailer)], self.key_id,
                                        self.sealer.digest)
        job = FinishedPack(name, self.buf, iname, blob)
        self._start()
        if self.sink is not None:
            self.sink.submit(job)
            return out
        try:
            save_finished(self.backend, job, out)
        finally:
            self.written.extend(out)
        return out


# -- index files ---------------------------------------------------------------------------


def encode_index_file(
    groups: list[tuple[bytes, bytes]], key_id: int = 0, digest_fn: DigestFn = strong_digest
) -> tuple[str, bytes]:
    """(name, content) of an index file for ``(pack id, concatenated entries)`` groups
    (``digest_fn``: keyed BLAKE3 in an encrypted repository)."""
    parts = [INDEX_HEADER.pack(INDEX_MAGIC, VERSION, 0, key_id, len(groups))]
    for pid, entries in groups:
        parts.append(GROUP.pack(pid, len(entries) // ENTRY_SIZE))
        parts.append(entries)
    body = b"".join(parts)
    digest = digest_fn(body)
    return digest.hex(), body + digest


def decode_index_file(
    name: str, blob: bytes, digest_fn: DigestFn = strong_digest
) -> list[tuple[bytes, np.ndarray]]:
    """Check an index file against its name; returns ``(pack id, entries)`` groups."""
    what = f"index file {name[:16]}"
    if len(blob) < INDEX_HEADER.size + 32:
        raise CorruptionError(f"{what}: too short")
    body, digest = memoryview(blob)[:-32], blob[-32:]
    if digest_fn(body) != digest or digest.hex() != name:
        raise CorruptionError(f"{what}: content does not match its name (torn or altered)")
    magic, version, _flags, _key, ngroups = INDEX_HEADER.unpack_from(blob, 0)
    if magic != INDEX_MAGIC:
        raise CorruptionError(f"{what}: bad magic")
    if version != VERSION:
        raise CorruptionError(f"{what}: version {version} is not supported")
    pos = INDEX_HEADER.size
    out: list[tuple[bytes, np.ndarray]] = []
    for _ in range(ngroups):
        if pos + GROUP.size > len(body):
            raise CorruptionError(f"{what}: truncated")
        pid, count = GROUP.unpack_from(blob, pos)
        pos += GROUP.size
        end = pos + count * ENTRY_SIZE
        if end > len(body):
            raise CorruptionError(f"{what}: truncated")
        out.append((bytes(pid), parse_entries(body[pos:end], count, what=what)))
        pos = end
    if pos != len(body):
        raise CorruptionError(f"{what}: trailing bytes")
    return out


# -- reading a pack's own description --------------------------------------------------------


def read_pack_trailer(backend: Backend, name: str, size: int | None = None) -> np.ndarray:
    """Check a pack's header, footer and trailer (not the blobs); return its entries."""
    what = f"pack {name[:16]}"
    if size is None:
        info = backend.stat("data", name)
        if info is None:
            raise CorruptionError(f"{what} is missing")
        size = info.size
    if size < PACK_HEADER_SIZE + PACK_FOOTER_SIZE:
        raise CorruptionError(f"{what}: too short ({size} bytes)")
    header = backend.load("data", name, 0, PACK_HEADER_SIZE)
    footer = backend.load("data", name, size - PACK_FOOTER_SIZE, PACK_FOOTER_SIZE)
    if len(header) != PACK_HEADER_SIZE or len(footer) != PACK_FOOTER_SIZE:
        raise CorruptionError(f"{what}: truncated")
    magic, version, _f, key_id, _r, pid = PACK_HEADER.unpack(header)
    sealer = sealer_of(backend)
    count, tlen, digest, _r2, end = PACK_FOOTER.unpack(footer)
    if magic != PACK_MAGIC or end != PACK_END:
        raise CorruptionError(f"{what}: bad magic (not a pack, or torn)")
    if version != VERSION:
        raise CorruptionError(f"{what}: version {version} is not supported")
    if pid.hex() != name:
        raise CorruptionError(f"{what}: holds pack {pid.hex()[:16]} (objects swapped or renamed)")
    if key_id != sealer.key_id:
        raise CorruptionError(f"{what}: sealed with key {key_id:08x}, not this repository's")
    overhead = SEAL_OVERHEAD if isinstance(sealer, Sealer) else 0
    if tlen != count * ENTRY_SIZE + overhead or (
        tlen > size - PACK_HEADER_SIZE - PACK_FOOTER_SIZE
    ):
        raise CorruptionError(f"{what}: trailer length is inconsistent")
    tstart = size - PACK_FOOTER_SIZE - tlen
    trailer = backend.load("data", name, tstart, tlen)
    if isinstance(sealer, Sealer):  # the AEAD tag authenticates header and trailer
        trailer = sealer.open_trailer(header, trailer, what)
    elif strong_digest(header + trailer) != digest:
        raise CorruptionError(f"{what}: header/trailer digest mismatch")
    entries = parse_entries(trailer, count, what=what)
    if count:
        off = entries["offset"].astype(np.int64)
        ln = entries["stored_len"].astype(np.int64)
        if off[0] < PACK_HEADER_SIZE or (off[1:] < off[:-1] + ln[:-1]).any() or (
            off[-1] + ln[-1] > tstart
        ):
            raise CorruptionError(f"{what}: blobs overlap or lie outside the pack")
    return entries
