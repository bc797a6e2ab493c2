"""Format 2 objects: chunk ids, blobs and entries, packs, index files, paged disk
indexes and manifests: the documented byte layout, round trips and damage."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import xxhash

from snapferry.engine.errors import CorruptionError, RepositoryError
from snapferry.engine.store.backends.local import LocalBackend
from snapferry.engine.store.blobs import (
    CODEC_RAW,
    CODEC_ZSTD,
    ENTRY,
    ENTRY_SIZE,
    TYPE_CHUNK,
    check_blob,
    encode,
)
from snapferry.engine.store.chunkindex import BYTES_PER_ENTRY, ChunkIndex
from snapferry.engine.store.hashing import NULL_ID, chunk_id, is_zero, strong_digest
from snapferry.engine.store.index import DiskIndex
from snapferry.engine.store.manifest import DiskEntry, Manifest, decode_pages, encode_pages
from snapferry.engine.store.pack import (
    PACK_FOOTER_SIZE,
    PACK_HEADER_SIZE,
    PackWriter,
    decode_index_file,
    read_pack_trailer,
)

TEXT = b"snapferry keeps chunks small and honest. " * 2000


# -- hashing -----------------------------------------------------------------------
def test_chunk_id_is_keyed_xxh3_128() -> None:
    a = chunk_id(1, TEXT)
    assert len(a) == 16
    assert a == xxhash.xxh3_128_digest(TEXT, 1)
    assert chunk_id(2, TEXT) != a, "the seed must change the id"
    assert chunk_id(1, memoryview(bytearray(TEXT))) == a, "buffers hash like bytes"


def test_strong_digest_is_blake3() -> None:
    import blake3

    assert strong_digest(TEXT) == blake3.blake3(TEXT).digest()
    assert len(strong_digest(b"")) == 32


def test_is_zero() -> None:
    buf = bytearray(1 << 20)
    assert is_zero(memoryview(buf))
    assert is_zero(bytes(10)) and is_zero(b"")
    buf[-1] = 1
    assert not is_zero(memoryview(buf))
    assert is_zero(memoryview(buf)[:-1]), "a slice of a buffer"
    assert is_zero(np.zeros(7, dtype=np.uint32).data), "non-byte formats"
    assert not is_zero(np.array([0, 1 << 20], dtype=np.uint32).data)
    assert bytes(16) == NULL_ID


# -- blobs ----------------------------------------------------------------------------
def test_blob_codecs() -> None:
    codec, stored = encode(TEXT, level=3)
    assert codec == CODEC_ZSTD and len(stored) < len(TEXT) // 10
    rnd = os.urandom(1 << 16)
    codec2, stored2 = encode(rnd, level=3)
    assert codec2 == CODEC_RAW and bytes(stored2) == rnd
    cid = chunk_id(7, TEXT)
    got = check_blob(stored, cid=cid, codec=codec, raw_len=len(TEXT), seed=7,
                     crc=None, digest=strong_digest(TEXT))
    assert bytes(got) == TEXT
    with pytest.raises(CorruptionError, match="another id"):
        check_blob(stored, cid=chunk_id(8, TEXT), codec=codec, raw_len=len(TEXT), seed=7)
    with pytest.raises(CorruptionError, match=r"decodes to|decompress"):
        check_blob(stored, cid=cid, codec=codec, raw_len=len(TEXT) - 1, seed=7)


def test_entry_layout_is_the_documented_one() -> None:
    e = ENTRY.pack(b"I" * 16, 1, 1, 0, 0x0102030405060708, 9, 10, 11, b"D" * 32)
    assert ENTRY_SIZE == len(e) == 72
    assert e[:16] == b"I" * 16 and e[16] == 1 and e[17] == 1
    assert e[20:28] == bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert struct.unpack(">III", e[28:40]) == (9, 10, 11) and e[40:] == b"D" * 32


# -- packs and index files ------------------------------------------------------------
@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(str(tmp_path / "b"), create=True)


def _blobs(n: int) -> list[bytes]:
    return [os.urandom(1000) + bytes(3000) for _ in range(n)]


def test_pack_and_index_file_layout(backend: LocalBackend) -> None:
    pw = PackWriter(backend, 1 << 20)
    datas = _blobs(3)
    for d in datas:
        codec, stored = encode(d, level=1)
        pw.add(chunk_id(1, d), TYPE_CHUNK, codec, stored, len(d), strong_digest(d))
    w = pw.flush()
    assert len(w.packs) == 1 and len(w.indexes) == 1
    name = w.packs[0]
    raw = backend.load("data", name)
    assert raw[:4] == b"SFPK" and raw[4:6] == b"\x00\x02" and raw[16:48].hex() == name
    assert raw[-4:] == b"SFPE" and struct.unpack(">I", raw[-48:-44])[0] == 3
    entries = read_pack_trailer(backend, name)
    assert [bytes(e["id"]) for e in entries] == [chunk_id(1, d) for d in datas]
    assert int(entries[0]["offset"]) == PACK_HEADER_SIZE
    assert len(raw) == int(entries[-1]["offset"]) + int(entries[-1]["stored_len"]) + (
        3 * ENTRY_SIZE + PACK_FOOTER_SIZE)
    iname = w.indexes[0]
    blob = backend.load("index", iname)
    assert blob[:4] == b"SFIN" and strong_digest(blob[:-32]).hex() == iname
    groups = decode_index_file(iname, blob)
    assert groups[0][0].hex() == name and groups[0][1].tobytes() == entries.tobytes()


def test_pack_fills_and_flushes_at_target_size(backend: LocalBackend) -> None:
    pw = PackWriter(backend, 10_000)
    for d in _blobs(10):
        pw.add(chunk_id(1, d), TYPE_CHUNK, CODEC_RAW, d, len(d), strong_digest(d))
    pw.flush()
    assert len(pw.written.packs) == 5 and len(pw.written.indexes) == 5
    for name in pw.written.packs:
        assert (backend.stat("data", name) or pytest.fail("gone")).size <= 10_000 + 2 * 72 + 48


@pytest.mark.parametrize("where", [0, 20, -1, -40, -100])
def test_damaged_pack_structure_detected(backend: LocalBackend, where: int) -> None:
    pw = PackWriter(backend, 1 << 20)
    for d in _blobs(2):
        pw.add(chunk_id(1, d), TYPE_CHUNK, CODEC_RAW, d, len(d), strong_digest(d))
    name = pw.flush().packs[0]
    path = backend.root + f"/data/{name[:2]}/{name}"
    raw = bytearray(Path(path).read_bytes())
    raw[where] ^= 0x10
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(CorruptionError):
        read_pack_trailer(backend, name)


def test_swapped_pack_names_detected(backend: LocalBackend) -> None:
    names = []
    for _ in range(2):
        pw = PackWriter(backend, 1 << 20)
        d = os.urandom(100)
        pw.add(chunk_id(1, d), TYPE_CHUNK, CODEC_RAW, d, len(d), strong_digest(d))
        names.append(pw.flush().packs[0])
    pa = backend.root + f"/data/{names[0][:2]}/{names[0]}"
    pb = backend.root + f"/data/{names[1][:2]}/{names[1]}"
    a, b = Path(pa).read_bytes(), Path(pb).read_bytes()
    Path(pa).write_bytes(b)
    Path(pb).write_bytes(a)
    for n in names:
        with pytest.raises(CorruptionError, match="swapped"):
            read_pack_trailer(backend, n)


def test_torn_or_renamed_index_file_never_used(backend: LocalBackend) -> None:
    pw = PackWriter(backend, 1 << 20)
    d = os.urandom(100)
    pw.add(chunk_id(1, d), TYPE_CHUNK, CODEC_RAW, d, len(d), strong_digest(d))
    iname = pw.flush().indexes[0]
    path = backend.root + f"/index/{iname}"
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[:-10])
    idx = ChunkIndex()
    rep = idx.load(backend)
    assert len(idx) == 0 and rep.bad_files and "torn" in rep.bad_files[0][1]


def test_chunk_index_table(backend: LocalBackend) -> None:
    pw = PackWriter(backend, 1 << 20)
    datas = _blobs(50)
    for d in datas:
        pw.add(chunk_id(1, d), TYPE_CHUNK, CODEC_RAW, d, len(d), strong_digest(d))
    pw.flush()
    idx = ChunkIndex()
    idx.load(backend)
    assert len(idx) == 50 and BYTES_PER_ENTRY == 70 and idx.nbytes() == 50 * 86
    d = datas[17]
    cid = chunk_id(1, d)
    assert idx.lookup_valid(cid, strong_digest(d), len(d))
    assert not idx.lookup_valid(chunk_id(1, b"absent"), strong_digest(b"absent"), 6)
    with pytest.raises(CorruptionError, match="alias"):
        idx.lookup_valid(cid, strong_digest(b"other"), len(d))
    rows = idx.locations_for(np.frombuffer(cid + chunk_id(1, b"x"), np.uint8).reshape(2, 16))
    assert rows[0] >= 0 and rows[1] == -1
    assert sorted(idx.ids()) == sorted(chunk_id(1, x) for x in datas)


# -- paged disk index -----------------------------------------------------------------
def test_paged_index_set_get_and_pages() -> None:
    idx = DiskIndex.empty(10 * 256 * 4096 + 4096 + 5, 4096, page_entries=256)
    assert len(idx) == 10 * 256 + 2 and idx.page_count == 11 and idx.page_len(10) == 2
    assert idx.loaded_pages() == 0 and idx.zero_count() == len(idx)
    a, b = chunk_id(1, b"a"), chunk_id(1, b"b")
    idx.set_many(np.array([3, 700, 2561]), [a, b, a])
    assert idx.loaded_pages() == 3 and idx.get(700) == b and idx.get(2561) == a
    assert idx.get(5) == NULL_ID and idx.zero_count() == len(idx) - 3
    assert idx.unique_ids() == {a, b}
    assert idx.nonzero_mask().sum() == 3 and idx.ids.shape == (len(idx), 16)
    grown = idx.resized(idx.virtual_size + 4096 * 300)
    assert grown.get(2561) == a and grown.get(len(grown) - 1) == NULL_ID
    shrunk = idx.resized(701 * 4096)
    assert len(shrunk) == 701 and shrunk.get(700) == b and shrunk.unique_ids() == {a, b}


def test_page_refs_encoding() -> None:
    ids: list[bytes | None] = [None, None, b"\x01" * 16, None, b"\x02" * 16, None, None, None]
    refs = encode_pages(ids)
    assert refs == [2, "01" * 16, 1, "02" * 16, 3]
    assert decode_pages(refs) == ids


# -- manifests ------------------------------------------------------------------------
def _manifest() -> Manifest:
    return Manifest(
        backup_id="20261125T193924Z-3f9a0000",
        vm="web01",
        chunk_size=1 << 20,
        consistency="filesystem",
        quiesced=True,
        freeze_ms=12.5,
        disks=[DiskEntry("sda", 1 << 30, chunks=1024, zero_chunks=10, pages=[1],
                         tracking={"bitmap": "sf-1"})],
        extra={"qemu": "7.2"},
    )


def test_manifest_json_roundtrip() -> None:
    m = _manifest()
    text = m.to_json()
    d = json.loads(text)
    assert d["format"] == 2 and d["disks"][0]["tracking"] == {"bitmap": "sf-1"}
    assert Manifest.from_json(text) == m


@pytest.mark.parametrize(
    "bad",
    [b"{not json", b"[]", b'{"format": 2}', b"\xff\xfe", b'{"format": "2"}'],
)
def test_bad_manifest_is_corruption(bad: bytes) -> None:
    with pytest.raises(CorruptionError):
        Manifest.from_json(bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "sideways"), ("vm", 7), ("chunk_size", "1M"), ("created", 5),
        ("quiesced", "yes"), ("freeze_ms", "slow"), ("extra", []), ("disks", {}),
        ("parent", 3),
    ],
)
def test_manifest_wrong_field_types_are_corruption(field: str, value: object) -> None:
    d = _manifest().to_dict()
    d[field] = value
    with pytest.raises(CorruptionError):
        Manifest.from_dict(d)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("virtual_size", "1G"), ("chunks", 3), ("chunks", None), ("zero_chunks", -1),
        ("pages", "all"), ("pages", [2]), ("pages", ["xyz"]), ("pages", [0, 1]),
        ("page_entries", 1000), ("source", []), ("name", ""), ("bytes_read", 1.5),
        ("full_reason", 3),
    ],
)
def test_manifest_wrong_disk_fields_are_corruption(field: str, value: object) -> None:
    d = _manifest().to_dict()
    d["disks"][0][field] = value
    with pytest.raises(CorruptionError):
        Manifest.from_dict(d)


def test_other_manifest_formats_refused() -> None:
    d = _manifest().to_dict()
    d["format"] = 3
    with pytest.raises(RepositoryError, match="newer") as ei:
        Manifest.from_dict(d)
    assert not isinstance(ei.value, CorruptionError)
    d["format"] = 1
    with pytest.raises(RepositoryError, match="format 1"):
        Manifest.from_dict(d)
