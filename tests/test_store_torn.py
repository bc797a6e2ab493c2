"""Torn chunks: ``put`` no longer fsyncs each chunk (durability comes from the syncfs
before the manifest rename), so a crash can leave a chunk file that is empty, short or
half written. No manifest references it, but a later backup must not dedup against it:
``has_valid`` refuses it and ``put(..., replace=True)`` replaces it.

Also the reader's fast decode path (``decode_for_read``) and restore's writeback.
A real crash cannot be staged here, so the tests write the torn files a crash can leave
(zero length, truncated, right size with the payload never written) by hand.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli
from store_helpers import backup_image, make_mixed_image

import snapferry.engine.restore as restore_mod
from snapferry.engine.errors import CorruptionError
from snapferry.engine.restore import restore
from snapferry.engine.store import Repository
from snapferry.engine.store.chunkfmt import (
    CODEC_RAW,
    CODEC_ZSTD,
    HEADER_SIZE,
    check_blob,
    decode_for_read,
    decode_verified,
    encode_chunk,
    parse_header,
)
from snapferry.engine.store.hashing import chunk_id, strong_digest

MiB = 1 << 20
TEXT = b"the quick brown fox jumps over the lazy dog\n" * 3000
RANDOM = os.urandom(100_000)


def _zero_length(blob: bytes) -> bytes:
    return b""


def _truncated(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def _header_only(blob: bytes) -> bytes:
    return blob[:HEADER_SIZE]


def _payload_never_written(blob: bytes) -> bytes:
    """Right size, valid header, payload still zeros (data blocks lost in the crash)."""
    return blob[:HEADER_SIZE] + bytes(len(blob) - HEADER_SIZE)


def _all_zeros(blob: bytes) -> bytes:
    return bytes(len(blob))


TEARS: dict[str, Callable[[bytes], bytes]] = {
    "zero-length": _zero_length,
    "truncated": _truncated,
    "header-only": _header_only,
    "payload-never-written": _payload_never_written,
    "all-zeros": _all_zeros,
}


def _tear(path: str, how: Callable[[bytes], bytes]) -> None:
    p = Path(path)
    blob = p.read_bytes()
    os.chmod(p, 0o644)
    p.write_bytes(how(blob))


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=256 << 10, zstd_level=1)


# -- has_valid / put(replace=True) ---------------------------------------------------


def test_has_valid_absent_and_intact(repo: Repository) -> None:
    s = repo.store
    cid, digest = chunk_id(repo.seed, TEXT), strong_digest(TEXT)
    assert s.has_valid(cid, digest, len(TEXT)) is False, "absent"
    assert s.put(cid, encode_chunk(TEXT, level=1)) is True
    assert s.has_valid(cid, digest, len(TEXT)) is True
    assert s.is_intact(cid)


def test_has_valid_refuses_to_alias_different_data(repo: Repository) -> None:
    """An intact chunk under the id but with another BLAKE3 or length is an XXH3
    collision: an error, never a miss (a miss would let put replace good data)."""
    s = repo.store
    cid = chunk_id(repo.seed, TEXT)
    s.put(cid, encode_chunk(TEXT, level=1))
    with pytest.raises(CorruptionError, match="different data"):
        s.has_valid(cid, strong_digest(RANDOM), len(TEXT))
    with pytest.raises(CorruptionError, match="different data"):
        s.has_valid(cid, strong_digest(TEXT), len(TEXT) + 1)
    before = Path(s.path_of(cid)).read_bytes()
    assert s.put(cid, encode_chunk(RANDOM, level=1), replace=True) is False
    assert Path(s.path_of(cid)).read_bytes() == before, "an intact chunk is never replaced"


@pytest.mark.parametrize("tear", sorted(TEARS))
@pytest.mark.parametrize("data", [TEXT, RANDOM], ids=["zstd", "raw"])
def test_torn_chunk_is_no_dedup_hit_and_is_replaced(
    repo: Repository, tear: str, data: bytes
) -> None:
    s = repo.store
    cid, digest = chunk_id(repo.seed, data), strong_digest(data)
    blob = encode_chunk(data, level=1)
    assert parse_header(blob).codec == (CODEC_ZSTD if data is TEXT else CODEC_RAW)
    s.put(cid, blob)
    _tear(s.path_of(cid), TEARS[tear])

    assert s.has(cid), "the torn file is there"
    assert s.has_valid(cid, digest, len(data)) is False, "but it is no dedup hit"
    assert not s.is_intact(cid)
    with pytest.raises(CorruptionError):
        decode_verified(s.get(cid), cid, repo.seed)
    assert s.put(cid, blob) is False, "a plain put still leaves an existing file alone"

    assert s.put(cid, blob, replace=True) is True, "replace=True rewrites the torn file"
    assert s.has_valid(cid, digest, len(data)) is True
    assert decode_verified(s.get(cid), cid, repo.seed) == data
    assert s.put(cid, blob, replace=True) is False, "now intact: nothing to replace"
    assert s.temp_files() == []


def test_backup_after_a_crash_does_not_reuse_torn_chunks(repo: Repository, tmp_path: Path) -> None:
    """A crashed backup's chunks (no manifest) are torn; the next backup of the same
    data must rewrite them, and its restore must be byte-identical."""
    img = tmp_path / "disk.img"
    make_mixed_image(img, 6 * MiB + 777, seed=5)
    data = img.read_bytes()
    cs = repo.chunk_size
    # the "crashed" backup: chunks stored, no commit, then torn by the crash
    torn = []
    for k, i in enumerate(range(0, len(data), cs)):
        part = data[i : i + cs]
        if not any(part):
            continue
        cid = chunk_id(repo.seed, part)
        if repo.store.put(cid, encode_chunk(part, level=1)):
            tear = TEARS[sorted(TEARS)[k % len(TEARS)]]
            _tear(repo.store.path_of(cid), tear)
            torn.append(cid)
    assert len(torn) >= len(TEARS), "the image must give every kind of tear"
    assert repo.list_backups() == []

    m = backup_image(repo, {"sda": img})
    entry = m.disk("sda")
    assert entry.chunks_reused == 0, "no torn chunk counted as a dedup hit"
    assert entry.chunks_new == len(torn)
    assert all(repo.store.is_intact(c) for c in torn)
    out = tmp_path / "out.raw"
    restore(repo, m.backup_id, to=out, workers=2)
    assert out.read_bytes() == data


def test_cli_backup_after_a_crash_does_not_reuse_torn_chunks(tmp_path: Path) -> None:
    """The real pipeline (``snapferry backup FILE``, reader worker processes) over a
    repository holding torn chunks of the same data from a crashed backup."""
    rp = tmp_path / "repo"
    p = run_cli("init", rp, "--chunk-size", "256K")
    assert p.returncode == 0, p.stderr
    repo = Repository.open(rp)
    img = tmp_path / "disk.img"
    make_mixed_image(img, 4 * MiB, seed=9)
    data = img.read_bytes()
    cs = repo.chunk_size
    n_torn = 0
    for i in range(0, len(data), cs):
        part = data[i : i + cs]
        if any(part):
            cid = chunk_id(repo.seed, part)
            if repo.store.put(cid, encode_chunk(part, level=1)):
                _tear(repo.store.path_of(cid), _payload_never_written)
                n_torn += 1
    assert n_torn > 0
    p = run_cli("backup", img, "--repo", rp, "--name", "vm")
    assert p.returncode == 0, p.stderr
    bid = repo.list_backups("vm")[-1].backup_id
    out = tmp_path / "out.raw"
    p = run_cli("restore", bid, "--repo", rp, "--to", out)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == data


# -- the reader's fast path ----------------------------------------------------------


@pytest.mark.parametrize("data", [TEXT, RANDOM], ids=["zstd", "raw"])
def test_decode_for_read_returns_the_data(data: bytes) -> None:
    blob = encode_chunk(data, level=1)
    cid = chunk_id(7, data)
    got = decode_for_read(blob, cid, 7)
    assert bytes(got) == data
    assert check_blob(blob).raw_len == len(data)


@pytest.mark.parametrize("where", [0, 4, 5, 9, 13, HEADER_SIZE + 3, -1])
@pytest.mark.parametrize("data", [TEXT, RANDOM], ids=["zstd", "raw"])
def test_decode_for_read_catches_a_flipped_byte_that_matters(data: bytes, where: int) -> None:
    """magic, version, codec, raw_len, stored_len, payload: all caught."""
    blob = bytearray(encode_chunk(data, level=1))
    blob[where] ^= 0x40
    with pytest.raises(CorruptionError):
        decode_for_read(bytes(blob), chunk_id(7, data), 7)


@pytest.mark.parametrize("where", [16, 40, 48, 51])
def test_decode_for_read_ignores_what_it_does_not_need(where: int) -> None:
    """A flip in the stored BLAKE3 or CRC does not change the data: the id proves the
    data, so the reader returns it intact; ``verify`` (all checks) still reports it."""
    blob = bytearray(encode_chunk(TEXT, level=1))
    blob[where] ^= 0x40
    assert bytes(decode_for_read(bytes(blob), chunk_id(7, TEXT), 7)) == TEXT
    with pytest.raises(CorruptionError, match="CRC"):
        decode_verified(bytes(blob), chunk_id(7, TEXT), 7)


def test_decode_for_read_names_the_fault() -> None:
    """Failures are re-diagnosed with every check, so the message stays precise."""
    blob = bytearray(encode_chunk(TEXT, level=1))
    blob[len(blob) // 2] ^= 0x01
    with pytest.raises(CorruptionError, match="CRC"):
        decode_for_read(bytes(blob), chunk_id(7, TEXT), 7)
    good = encode_chunk(RANDOM, level=1)
    with pytest.raises(CorruptionError, match="another id"):
        decode_for_read(good, chunk_id(7, TEXT), 7)
    with pytest.raises(CorruptionError, match="header says"):
        decode_for_read(good[:-1], chunk_id(7, RANDOM), 7)


# -- restore's overlapped writeback --------------------------------------------------


def test_restore_with_frequent_writeback_is_identical(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start write-out after every chunk (the real default is every 32 MiB) with one
    chunk per thread task (default 4 MiB of chunks), so the sync_file_range path runs
    many times; the image must come out identical."""
    img = tmp_path / "disk.img"
    make_mixed_image(img, 5 * MiB + 3, seed=3)
    m = backup_image(repo, {"sda": img})
    calls: list[int] = []
    real = restore_mod._Writeback.wrote

    def counting(self: restore_mod._Writeback, n: int) -> None:
        calls.append(n)
        real(self, n)
        if sys.platform.startswith("linux"):
            assert self.fn is not None, "sync_file_range is available on Linux"

    monkeypatch.setattr(restore_mod, "WRITEBACK_EVERY", 1)
    monkeypatch.setattr(restore_mod, "BATCH_BYTES", 1)  # one chunk per batch
    monkeypatch.setattr(restore_mod._Writeback, "wrote", counting)
    out = tmp_path / "out.raw"
    res = restore(repo, m.backup_id, to=out, workers=2)
    assert out.read_bytes() == img.read_bytes()
    assert sum(calls) == res.bytes_written and len(calls) == res.unique_chunks
