"""Chunk writers and readers over a ``Backend``: what workers and restore use.

``ChunkWriterSpec`` is the picklable description a backup hands to its workers; each
worker opens a ``ChunkWriter`` from it (its own backend handle, its own copy of the
chunk index, its own pack). ``ChunkReader`` finds a blob through the chunk index and
proves it on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zstandard

from snapferry.engine.errors import CorruptionError, RepositoryError
from snapferry.engine.store.backend import Backend, BackendSpec
from snapferry.engine.store.blobs import (
    ENTRY_SIZE,
    TYPE_CHUNK,
    check_blob,
    compressor,
    encode,
)
from snapferry.engine.store.chunkindex import ChunkIndex, Location
from snapferry.engine.store.crypto import sealer_of
from snapferry.engine.store.hashing import ID_SIZE
from snapferry.engine.store.pack import PackWriter, WrittenObjects, read_pack_trailer
from snapferry.engine.store.saver import PackSaver

LEARN_MAX = 1 << 18  # other writers' chunks remembered (~60 MiB; 32 GiB of 128 KiB chunks)


@dataclass(frozen=True)
class ChunkWriterSpec:
    """Picklable: everything a worker needs to store chunks."""

    backend: BackendSpec
    seed: int
    zstd_level: int
    pack_size: int

    def open(self) -> ChunkWriter:
        return ChunkWriter(self)


@dataclass
class StoreOutcome:
    new: bool
    stored: int  # bytes of the blob written (0 for a dedup hit)
    pack: str = ""  # pack of the copy reused (hits) or written (new)


@dataclass
class WriterReport:
    written: WrittenObjects = field(default_factory=WrittenObjects)
    hit_packs: set[str] = field(default_factory=set)


class ChunkWriter:
    """Dedup check against the chunk index, then append to this writer's pack.

    ``background=True`` (reader workers): finished packs are saved by a ``PackSaver``
    thread while the caller goes on; with ``verify_saved`` that thread also reads each
    pack back and checks every blob once it is saved (the pre-commit ``--verify full``
    check, listed in ``WrittenObjects.verified``)."""

    def __init__(self, spec: ChunkWriterSpec, *, background: bool = False,
                 verify_saved: bool = False) -> None:
        self.spec = spec
        self.backend: Backend = spec.backend.open()
        self.index = ChunkIndex()
        self.index.load(self.backend, types=(TYPE_CHUNK,))
        self.saver: PackSaver | None = None
        if background:
            backend, seed = self.backend, spec.seed
            self.saver = PackSaver(
                backend, (lambda name: verify_written_pack(backend, name, seed))
                if verify_saved else None
            )
        self.pack = PackWriter(self.backend, spec.pack_size, sink=self.saver)
        self.digest = sealer_of(self.backend).digest  # keyed BLAKE3 when encrypted
        self.cctx: zstandard.ZstdCompressor = compressor(spec.zstd_level)
        # chunks this writer stored in this session: id -> (digest, raw_len)
        self.session: dict[bytes, tuple[bytes, int]] = {}
        # chunks other writers of the same backup stored (``learn``), oldest first
        self.others: dict[bytes, tuple[bytes, int]] = {}
        self.report = WriterReport()
        self.verified: set[str] = set()  # packs read back and checked once saved

    def store(self, cid: bytes, data: bytes | memoryview, digest: bytes) -> StoreOutcome:
        """Store the chunk unless an undamaged copy of the same data exists (rule W4).
        Raises ``CorruptionError`` when ``cid`` already names other data."""
        raw_len = memoryview(data).nbytes
        mine = self.session.get(cid)
        if mine is not None:
            if mine != (digest, raw_len):
                raise CorruptionError(
                    f"chunk id {cid.hex()} already names different data (hash collision/"
                    "alias): refusing to deduplicate; the backup was not committed"
                )
            return StoreOutcome(False, 0)
        theirs = self.others.get(cid)
        if theirs is not None:
            if theirs != (digest, raw_len):
                raise CorruptionError(
                    f"chunk id {cid.hex()} already names different data (hash collision/"
                    "alias): refusing to deduplicate; the backup was not committed"
                )
            return StoreOutcome(False, 0)
        if self.index.lookup_valid(cid, digest, raw_len):
            return StoreOutcome(False, 0)
        codec, stored = encode(data, level=self.spec.zstd_level, cctx=self.cctx)
        pid, _off, _entry = self.pack.add(cid, TYPE_CHUNK, codec, stored, raw_len, digest)
        self.session[cid] = (digest, raw_len)
        return StoreOutcome(True, memoryview(stored).nbytes, pid.hex())

    def learn(self, chunks: list[tuple[bytes, bytes, int]]) -> None:
        """Chunks ``(id, digest, raw_len)`` another writer of the same backup stored: a
        later copy here is a dedup hit (checked by digest and length like any other)
        instead of a second blob. Those chunks are committed with this backup or not at
        all, so the hit is as safe as one on this writer's own pack. At most
        ``LEARN_MAX`` are kept (the oldest go: a miss only stores a harmless duplicate)."""
        others = self.others
        for cid, digest, raw_len in chunks:
            others[cid] = (digest, raw_len)
        while len(others) > LEARN_MAX:
            del others[next(iter(others))]  # dicts keep insertion order: the oldest

    def take_written(self) -> WrittenObjects:
        """Objects saved since the last call (pack flushes happen as packs fill)."""
        w = self.pack.written
        self.pack.written = WrittenObjects()
        if self.saver is not None:
            w.extend(self.saver.take())
        self.verified.update(w.verified)
        return w

    def flush(self) -> WrittenObjects:
        """Save the pending pack; returns once everything handed over is saved."""
        self.pack.flush()
        if self.saver is not None:
            self.saver.wait()
        return self.take_written()

    def close(self) -> None:
        if self.saver is not None:
            self.saver.close()
        self.backend.close()


class ChunkReader:
    """Reads blobs by id through a loaded ``ChunkIndex``; thread-safe for reads."""

    def __init__(self, backend: Backend, seed: int, index: ChunkIndex) -> None:
        self.backend = backend
        self.seed = seed
        self.index = index
        self.sealer = sealer_of(backend)

    def read_at(self, loc: Location, cid: bytes, *, full: bool = False) -> bytes | memoryview:
        stored = self.backend.load("data", loc.pack, loc.offset, loc.stored_len)
        if len(stored) != loc.stored_len:
            raise CorruptionError(f"blob {cid.hex()}: pack {loc.pack[:16]} is truncated")
        sealer = self.sealer
        return check_blob(
            stored, cid=cid, codec=loc.codec, raw_len=loc.raw_len, seed=self.seed,
            crc=loc.crc if full else None, digest=loc.digest if full else None,
            digest_fn=sealer.digest,
            unseal=lambda b: sealer.open_blob(b, pack=loc.pack, offset=loc.offset,
                                              btype=loc.btype, cid=cid, codec=loc.codec),
        )

    def read(self, cid: bytes, *, full: bool = False) -> bytes | memoryview:
        """The raw bytes of ``cid``; tries every copy (rule R3). Raises
        ``CorruptionError`` naming the fault when no copy is good."""
        cands = self.index.candidates(cid)
        if not cands:
            raise CorruptionError(f"chunk {cid.hex()} is missing from the repository index")
        errors: list[str] = []
        for loc in cands:
            try:
                return self.read_at(loc, cid, full=full)
            except RepositoryError as e:
                errors.append(str(e))
        raise CorruptionError(f"chunk {cid.hex()}: " + "; ".join(errors))

    def page(self, pid: bytes, n: int) -> np.ndarray:
        """A disk-index page as an (n, 16) uint8 array (the ``DiskIndex`` loader)."""
        data = self.read(pid)
        if memoryview(data).nbytes != n * ID_SIZE:
            raise CorruptionError(f"index page {pid.hex()} holds the wrong number of entries")
        return np.frombuffer(bytes(data), dtype=np.uint8).reshape(n, ID_SIZE)


def verify_pack(backend: Backend, name: str, seed: int) -> int:
    """Read back a whole pack and check every blob fully (header, trailer, CRC, zstd,
    id, BLAKE3). Returns the pack's size; raises ``CorruptionError``."""
    info = backend.stat("data", name)
    if info is None:
        raise CorruptionError(f"pack {name[:16]} is missing")
    entries = read_pack_trailer(backend, name, info.size)
    blob = backend.load("data", name)
    mv = memoryview(blob)
    sealer = sealer_of(backend)
    for e in entries:
        off, n, cid, codec = int(e["offset"]), int(e["stored_len"]), bytes(e["id"]), int(e["codec"])
        btype = int(e["type"])

        def unseal(b: bytes | memoryview, o: int = off, c: bytes = cid, t: int = btype,
                   k: int = codec) -> bytes | memoryview:
            return sealer.open_blob(b, pack=name, offset=o, btype=t, cid=c, codec=k)

        check_blob(
            mv[off : off + n], cid=cid, codec=codec,
            raw_len=int(e["raw_len"]), seed=seed, crc=int(e["crc"]), digest=bytes(e["digest"]),
            digest_fn=sealer.digest, unseal=unseal,
        )
    return info.size


def verify_written_pack(backend: Backend, name: str, seed: int) -> int:
    """``verify_pack`` of a pack this backup wrote, its failure saying so."""
    try:
        return verify_pack(backend, name, seed)
    except CorruptionError as e:
        raise CorruptionError(f"pack {name[:16]} written by this backup: {e}") from None


__all__ = [
    "ENTRY_SIZE",
    "ChunkReader",
    "ChunkWriter",
    "ChunkWriterSpec",
    "StoreOutcome",
    "verify_pack",
    "verify_written_pack",
]
