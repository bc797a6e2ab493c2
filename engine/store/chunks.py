"""Chunk writers and readers over a ``Backend``: what workers and restore use.

``ChunkWriterSpec`` is the picklable description a backup hands to its workers; each
worker opens a ``ChunkWriter`` from it (its own backend handle, its own copy of the
chunk index, its own pack). ``ChunkReader`` finds a blob through the chunk index and
proves it on the way out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import zstandard

from snapferry.engine.errors import CorruptionError, RepositoryError
from snapferry.engine.store.backend import Backend, BackendSpec
from snapferry.engine.store.blobs import (
    CODEC_RAW,
    CODEC_ZSTD,
    ENTRY_SIZE,
    TYPE_CHUNK,
    check_blob,
    compressor,
    decode,
    decompressor,
    encode,
)
from snapferry.engine.store.chunkindex import ChunkIndex, Location
from snapferry.engine.store.crypto import sealer_of
from snapferry.engine.store.hashing import ID_SIZE, chunk_id
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

    def store(self, cid: bytes, data: bytes | memoryview, digest: bytes,
              encoded: tuple[int, bytes | memoryview] | None = None,
              indexed: bool | None = None) -> StoreOutcome:
        """Store the chunk unless an undamaged copy of the same data exists (rule W4).
        Raises ``CorruptionError`` when ``cid`` already names other data.

        Work done beforehand (the in-process reader's compute threads): ``encoded`` is
        ``blobs.encode(data)``; ``indexed`` what ``self.index.lookup_valid(cid, digest,
        raw_len)`` returned (the loaded index does not change while the writer stores;
        None: looked up here, which raises a collision). The decision is made here."""
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
        if indexed is None:
            indexed = self.index.lookup_valid(cid, digest, raw_len)
        if indexed:
            return StoreOutcome(False, 0)
        codec, stored = encoded or encode(data, level=self.spec.zstd_level, cctx=self.cctx)
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


RUN_MAX = 4 << 20
"""Bytes of one pack read with one ranged load at most (a run of blobs)."""
RUN_GAP = 64 << 10
"""Bytes of blobs nobody asked for that a run reads through to join two wanted ones
(one bigger pread beats two syscalls and two Python round trips)."""


@dataclass(frozen=True, slots=True)
class Run:
    """Blobs of one pack read with one ranged load: ``[start, end)`` of pack number
    ``pack`` (``ChunkIndex.packs``), holding the table rows ``rows`` (offset order);
    ``items`` are the positions of those blobs in the caller's request."""

    pack: int
    start: int
    end: int
    rows: list[int]
    items: list[int]


class Scratch:
    """Buffers one thread decodes blobs into (``ChunkReader.iter_run``)."""

    __slots__ = ("plain", "raw")

    def __init__(self, chunk_size: int) -> None:
        self.plain = bytearray(chunk_size + 64)  # a sealed raw blob: the chunk + AEAD
        # where the next zstd blob decodes to (restore points it at a write buffer's slot)
        self.raw: bytearray | memoryview = bytearray(chunk_size)


Decoded = bytes | memoryview | CorruptionError
"""A blob's raw bytes, or the error that names why no copy of it is good."""


class _Columns:
    """The chunk index's table as plain column arrays (structured-field access is slow)."""

    __slots__ = ("codec", "offset", "pack", "raw_len", "stored_len", "table", "type")

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.pack = np.ascontiguousarray(table["pack"], dtype=np.int64)
        self.offset = np.ascontiguousarray(table["offset"], dtype=np.int64)
        self.stored_len = np.ascontiguousarray(table["stored_len"], dtype=np.int64)
        self.raw_len = np.ascontiguousarray(table["raw_len"], dtype=np.int64)
        self.codec = np.ascontiguousarray(table["codec"], dtype=np.int64)
        self.type = np.ascontiguousarray(table["type"], dtype=np.int64)


class ChunkReader:
    """Reads blobs by id through a loaded ``ChunkIndex``; thread-safe for reads.

    Two ways in: ``read(cid)`` (one blob, every copy tried: the precise error), and the
    bulk path every restore-point reader uses: ``rows_for`` (vectorised lookup),
    ``plan_runs`` (wanted blobs grouped by pack, in offset order, adjacent ones joined
    into runs of at most ``RUN_MAX`` bytes) and ``iter_run`` (one ranged load per run,
    then unseal, zstd and the keyed-id check of each blob; a blob that fails goes the
    ``read`` way, so a damaged copy with a good twin elsewhere still reads).
    """

    def __init__(self, backend: Backend, seed: int, index: ChunkIndex) -> None:
        self.backend = backend
        self.seed = seed
        self.index = index
        self.sealer = sealer_of(backend)
        self._cols: _Columns | None = None

    # -- the bulk path ---------------------------------------------------------------------
    def _columns(self) -> _Columns:
        t = self.index.table
        cols = self._cols
        if cols is None or cols.table is not t:
            len(self.index)  # settle pending entries first
            t = self.index.table
            cols = self._cols = _Columns(t)
        return cols

    def rows_for(self, ids: np.ndarray) -> np.ndarray:
        """Table row of an undamaged copy of each id ((n, 16) uint8), or -1."""
        return self.index.locations_for(ids)

    def plan_runs(
        self, rows: np.ndarray, *, gap: int | None = None, most: int | None = None,
        max_blobs: int = 0, places: np.ndarray | None = None,
    ) -> list[Run]:
        """Runs covering every row ``>= 0`` of ``rows`` (pack order, then offset);
        ``gap``/``most`` default to ``RUN_GAP``/``RUN_MAX``; with ``max_blobs`` no run
        holds more blobs than that; with ``places`` (a number per request position,
        e.g. where its chunk lands on the disk) a run holds only blobs whose places
        follow one another (``p, p + 1, ...``)."""
        gap = RUN_GAP if gap is None else gap
        most = RUN_MAX if most is None else most
        items = np.flatnonzero(rows >= 0)
        if not items.size:
            return []
        cols = self._columns()
        r = rows[items]
        pack, off = cols.pack[r], cols.offset[r]
        order = np.lexsort((off, pack))
        items, r, pack, off = items[order], r[order], pack[order], off[order]
        end = off + cols.stored_len[r]
        brk = np.flatnonzero(
            (pack[1:] != pack[:-1]) | (off[1:] - end[:-1] > gap) | (off[1:] < end[:-1])
        ) + 1
        bounds = [0, *brk.tolist(), len(items)]
        rl, il, ol, el, pl = r.tolist(), items.tolist(), off.tolist(), end.tolist(), pack.tolist()
        at = places[items].tolist() if places is not None else None
        out: list[Run] = []
        for a, b in itertools.pairwise(bounds):
            s = a
            for k in range(a + 1, b + 1):  # cut a long segment at ``most`` bytes
                if (k == b or el[k] - ol[s] > most or k - s == max_blobs
                        or (at is not None and at[k] != at[k - 1] + 1)):
                    out.append(Run(pl[s], ol[s], max(el[s:k]), rl[s:k], il[s:k]))
                    s = k
        return out

    def iter_run(self, run: Run, cids: list[bytes], scratch: Scratch, *, own: bool = False
                 ) -> Iterator[Decoded]:
        """Decode every blob of ``run`` (``cids[j]`` is the id of ``run.rows[j]``) after
        one ranged load: unsealed into ``scratch`` (one per thread) and, unless ``own``,
        decompressed into it too, so a value yielded is valid only until the next one
        (no allocation per blob). With ``own`` every value is a ``bytes`` of its own
        (for a cache). A blob that fails goes the ``read`` way: every copy tried, and
        the error that names the fault is yielded in its place."""
        cols = self._columns()
        pack_id = self.index.packs[run.pack]
        pack = pack_id.hex()
        n = run.end - run.start
        buf: memoryview | None = None
        try:
            got = self.backend.load("data", pack, run.start, n)
            if len(got) == n:
                buf = memoryview(got)
        except RepositoryError:
            buf = None
        # the run's index columns as Python ints, once per run (not per blob)
        rows = np.asarray(run.rows, dtype=np.int64)
        offs = cols.offset[rows].tolist()
        stored = cols.stored_len[rows].tolist()
        raws = cols.raw_len[rows].tolist()
        types = cols.type[rows].tolist()
        codecs = cols.codec[rows].tolist()
        room = len(scratch.raw)
        start = run.start
        decode_into = self._decode_into
        for k, cid in enumerate(cids):
            data: Decoded | None = None
            raw_len = raws[k]
            if buf is not None and raw_len <= room:
                off = offs[k]
                o = off - start
                try:
                    data = decode_into(buf[o : o + stored[k]], scratch, pack, pack_id, off,
                                       types[k], cid, codecs[k], raw_len, own)
                except (CorruptionError, zstandard.ZstdError):
                    data = None
            if data is None:
                data = self._read_or_error(cid)
            yield data

    def _decode_into(
        self, stored: memoryview, scratch: Scratch, pack: str, pack_id: bytes, off: int,
        btype: int, cid: bytes, codec: int, raw_len: int, own: bool,
    ) -> bytes | memoryview:
        plain = memoryview(self.sealer.open_blob_into(stored, scratch.plain, pack=pack,
                                                      offset=off, btype=btype, cid=cid,
                                                      codec=codec, pack_id=pack_id))
        kind = codec & 0x0F
        data: bytes | memoryview
        if kind == CODEC_ZSTD and own:
            data = decode(kind, plain, raw_len)
        elif kind == CODEC_ZSTD:
            if zstandard.frame_content_size(plain) != raw_len:
                raise CorruptionError(f"blob {cid.hex()} decodes to another length")
            dst = memoryview(scratch.raw)[:raw_len]
            rd = decompressor().stream_reader(plain, read_size=plain.nbytes,
                                              read_across_frames=False)
            got = rd.readinto(dst)
            while 0 < got < raw_len:  # one call fills it; a short read is retried
                k = rd.readinto(dst[got:])
                if not k:
                    break
                got += k
            if got != raw_len:
                raise CorruptionError(f"blob {cid.hex()} decodes to {got} bytes, not {raw_len}")
            data = dst
        elif kind == CODEC_RAW:
            if plain.nbytes != raw_len:
                raise CorruptionError(f"blob {cid.hex()} is {plain.nbytes} bytes, not {raw_len}")
            data = bytes(plain) if own else plain
        else:
            raise CorruptionError(f"unknown blob codec {kind}")
        if chunk_id(self.seed, data) != cid:
            raise CorruptionError(f"blob {cid.hex()} holds data with another id")
        return data

    def _read_or_error(self, cid: bytes) -> Decoded:
        try:
            return self.read(cid)  # every copy; the error names the fault
        except CorruptionError as e:
            return e
        except RepositoryError as e:
            return CorruptionError(str(e))

    # -- one blob --------------------------------------------------------------------------

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
    "RUN_GAP",
    "RUN_MAX",
    "ChunkReader",
    "ChunkWriter",
    "ChunkWriterSpec",
    "Decoded",
    "Run",
    "Scratch",
    "StoreOutcome",
    "verify_pack",
    "verify_written_pack",
]
