"""Chunk ids, the chunk blob format, disk indexes and manifests: round trips and damage."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import xxhash

from snapferry.engine.errors import CorruptionError, RepositoryError
from snapferry.engine.store.chunkfmt import (
    CODEC_RAW,
    CODEC_ZSTD,
    HEADER_SIZE,
    decode_chunk,
    decode_verified,
    encode_chunk,
    parse_header,
)
from snapferry.engine.store.hashing import NULL_ID, chunk_id, is_zero, strong_digest
from snapferry.engine.store.index import DiskIndex
from snapferry.engine.store.manifest import DiskEntry, Manifest

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


# -- chunk blobs -------------------------------------------------------------------
def test_roundtrip_compressible_is_zstd() -> None:
    blob = encode_chunk(TEXT, level=3)
    hdr = parse_header(blob)
    assert hdr.codec == CODEC_ZSTD
    assert hdr.raw_len == len(TEXT)
    assert hdr.stored_len == len(blob) - HEADER_SIZE < len(TEXT) // 10
    assert hdr.digest == strong_digest(TEXT)
    assert blob[:4] == b"SFCK"
    assert decode_chunk(blob) == TEXT


def test_roundtrip_incompressible_is_raw() -> None:
    data = os.urandom(65536)
    blob = encode_chunk(memoryview(bytearray(data)), level=1)
    hdr = parse_header(blob)
    assert hdr.codec == CODEC_RAW
    assert hdr.stored_len == hdr.raw_len == len(data)
    assert blob[HEADER_SIZE:] == data
    assert decode_chunk(blob) == data


def test_header_layout_is_documented_one() -> None:
    blob = encode_chunk(TEXT, level=1)
    magic, ver, codec, flags, raw, stored, digest, crc = struct.unpack(">4sBBHII32sI", blob[:52])
    assert (magic, ver, codec, flags, raw) == (b"SFCK", 1, 1, 0, len(TEXT))
    assert stored == len(blob) - 52 and digest == strong_digest(TEXT)
    import zlib

    assert crc == zlib.crc32(blob[52:], zlib.crc32(blob[:48]))


@pytest.mark.parametrize("where", [0, 10, 20, HEADER_SIZE + 5, -1])
def test_flipped_byte_is_detected(where: int) -> None:
    blob = bytearray(encode_chunk(TEXT, level=3))
    blob[where] ^= 0x40
    with pytest.raises(CorruptionError):
        decode_chunk(bytes(blob))


def test_flip_in_raw_payload_is_detected() -> None:
    data = os.urandom(4096)
    blob = bytearray(encode_chunk(data, level=3))
    blob[HEADER_SIZE + 100] ^= 1
    with pytest.raises(CorruptionError, match="CRC"):
        decode_chunk(bytes(blob))


def test_consistent_forgery_fails_on_digest() -> None:
    """Payload and CRC rewritten consistently: only BLAKE3 can tell."""
    import zlib

    data = bytearray(os.urandom(4096))
    blob = bytearray(encode_chunk(bytes(data), level=3))
    blob[HEADER_SIZE] ^= 1
    crc = zlib.crc32(bytes(blob[HEADER_SIZE:]), zlib.crc32(bytes(blob[:48])))
    blob[48:52] = struct.pack(">I", crc)
    with pytest.raises(CorruptionError, match="BLAKE3"):
        decode_chunk(bytes(blob))


def test_truncated_chunk() -> None:
    blob = encode_chunk(TEXT, level=3)
    with pytest.raises(CorruptionError):
        decode_chunk(blob[:-1])
    with pytest.raises(CorruptionError, match="too short"):
        decode_chunk(blob[:20])
    with pytest.raises(CorruptionError):
        decode_chunk(blob + b"\0")


def test_decode_verified_checks_the_id() -> None:
    blob = encode_chunk(TEXT, level=3)
    assert decode_verified(blob, chunk_id(7, TEXT), 7) == TEXT
    with pytest.raises(CorruptionError, match="another id"):
        decode_verified(blob, chunk_id(8, TEXT), 7)


def test_future_chunk_version_refused() -> None:
    blob = bytearray(encode_chunk(TEXT, level=3))
    blob[4] = 2
    with pytest.raises(CorruptionError, match="version 2"):
        parse_header(bytes(blob))


# -- indexes -----------------------------------------------------------------------
def _index() -> DiskIndex:
    idx = DiskIndex.empty(10 * 65536 + 100, 65536)
    for i in (0, 3, 4, 10):
        idx.set(i, chunk_id(1, bytes([i]) * 10))
    idx.set(7, idx.get(3))
    return idx


def test_index_shape_and_counts() -> None:
    idx = _index()
    assert len(idx) == 11 and idx.ids.shape == (11, 16) and idx.ids.dtype == np.uint8
    assert idx.get(1) == NULL_ID
    assert idx.nonzero_count() == 5 and idx.zero_count() == 6
    assert len(idx.unique_ids()) == 4 and NULL_ID not in idx.unique_ids()
    assert idx.length(10) == 100 and idx.length(0) == 65536


def test_index_save_load_roundtrip(tmp_path: Path) -> None:
    idx = _index()
    p = tmp_path / "sda.idx"
    idx.save(p)
    assert p.stat().st_size == 64 + 11 * 16
    back = DiskIndex.load(p)
    assert back == idx
    assert back.virtual_size == idx.virtual_size and back.chunk_size == 65536


@pytest.mark.parametrize("where", [0, 9, 30, 64 + 3, -1])
def test_index_damage_detected(tmp_path: Path, where: int) -> None:
    p = tmp_path / "sda.idx"
    _index().save(p)
    data = bytearray(p.read_bytes())
    data[where] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptionError):
        DiskIndex.load(p)


def test_index_truncated(tmp_path: Path) -> None:
    p = tmp_path / "sda.idx"
    _index().save(p)
    p.write_bytes(p.read_bytes()[:-16])
    with pytest.raises(CorruptionError, match="body"):
        DiskIndex.load(p)


def test_index_resized_and_copy() -> None:
    idx = _index()
    c = idx.copy()
    c.set(0, NULL_ID)
    assert idx.get(0) != NULL_ID, "copy is independent"
    grown = idx.resized(20 * 65536)
    assert len(grown) == 20 and grown.get(3) == idx.get(3) and grown.get(15) == NULL_ID
    shrunk = idx.resized(4 * 65536)
    assert len(shrunk) == 4 and shrunk.get(3) == idx.get(3)
    grown.set_many([11, 12], [idx.get(0), idx.get(4)])
    assert grown.get(12) == idx.get(4)


# -- manifests ---------------------------------------------------------------------
def _manifest() -> Manifest:
    return Manifest(
        backup_id="20261125T193924Z-3f9a",
        vm="web01",
        chunk_size=1 << 20,
        mode="incremental",
        parent="20261124T193924Z-0001",
        consistency="filesystem",
        quiesced=True,
        freeze_ms=12.5,
        disks=[DiskEntry("sda", 1 << 30, "sda.idx", tracking={"bitmap": "sf-1"})],
        extra={"qemu": "7.2"},
    )


def test_manifest_json_roundtrip() -> None:
    m = _manifest()
    text = m.to_json()
    d = json.loads(text)
    assert d["format"] == 1 and d["disks"][0]["tracking"] == {"bitmap": "sf-1"}
    assert Manifest.from_json(text) == m


@pytest.mark.parametrize(
    "bad",
    [
        b"{not json",
        b"[]",
        b'{"format": 1}',
        b"\xff\xfe",
    ],
)
def test_bad_manifest_is_corruption(bad: bytes) -> None:
    with pytest.raises(CorruptionError):
        Manifest.from_json(bad)


def test_manifest_bad_field_values() -> None:
    d = _manifest().to_dict()
    d["mode"] = "sideways"
    with pytest.raises(CorruptionError, match="mode"):
        Manifest.from_dict(d)
    d = _manifest().to_dict()
    d["disks"][0]["index_file"] = "../../config"
    with pytest.raises(CorruptionError, match="index_file"):
        Manifest.from_dict(d)


def test_newer_manifest_format_refused() -> None:
    d = _manifest().to_dict()
    d["format"] = 2
    with pytest.raises(RepositoryError, match="newer") as ei:
        Manifest.from_dict(d)
    assert not isinstance(ei.value, CorruptionError)
