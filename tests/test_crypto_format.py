"""Encryption at rest, byte level (docs/FORMAT.md, *Encryption*): the Python API on real
repositories in temporary directories."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from snapferry.engine.errors import CorruptionError, RepositoryError, UsageError
from snapferry.engine.store import keys
from snapferry.engine.store.blobs import TYPE_CHUNK
from snapferry.engine.store.crypto import (
    ENVELOPE_MAGIC,
    SEAL_OVERHEAD,
    MasterKeys,
    Sealer,
    check_ciphertext,
    verify_mac,
)
from snapferry.engine.store.hashing import chunk_id
from snapferry.engine.store.pack import PACK_FOOTER, PackWriter, read_pack_trailer
from snapferry.engine.store.repo import Repository

PW = "pw for the format tests"


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(keys.TEST_SCRYPT_ENV, "1024")
    monkeypatch.delenv(keys.PASSWORD_ENV, raising=False)


def _store(repo: Repository, blobs: list[bytes]) -> str:
    pw = PackWriter(repo.backend, repo.pack_size)
    for b in blobs:
        cid = chunk_id(repo.seed, b)
        pw.add(cid, TYPE_CHUNK, 0, b, len(b), repo.sealer.digest(b))
    return pw.flush().packs[0]


def test_pack_layout(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", encryption="repokey", passphrase=PW)
    data = [os.urandom(1000), os.urandom(3000)]
    name = _store(repo, data)
    raw = (tmp_path / "r" / "data" / name[:2] / name).read_bytes()
    assert raw[:4] == b"SFPK" and struct.unpack(">I", raw[8:12])[0] == repo.sealer.key_id
    count, tlen, tag, _r, end = PACK_FOOTER.unpack(raw[-48:])
    assert (count, tlen, end) == (2, 2 * 72 + SEAL_OVERHEAD, b"SFPE")
    assert isinstance(repo.sealer, Sealer)
    assert tag == verify_mac(repo.sealer.keys.verify_key, "data", name, raw[:-40])
    assert len(raw) == 48 + sum(len(d) + SEAL_OVERHEAD for d in data) + tlen + 48
    entries = read_pack_trailer(repo.backend, name)
    assert [int(e["codec"]) for e in entries] == [0x10, 0x10]  # raw, sealed
    assert [int(e["stored_len"]) for e in entries] == [1028, 3028]
    for d in data:
        assert d not in raw
        assert repo.reader().read(chunk_id(repo.seed, d)) == d


def test_plaintext_unchanged(tmp_path: Path) -> None:
    """``encryption="none"``: no keys, key_id 0, plain BLAKE3 pack digest."""
    import blake3

    repo = Repository.init(tmp_path / "r")
    name = _store(repo, [os.urandom(500)])
    raw = (tmp_path / "r" / "data" / name[:2] / name).read_bytes()
    _count, tlen, digest, _r, _e = PACK_FOOTER.unpack(raw[-48:])
    assert tlen == 72 and digest == blake3.blake3(raw[:48] + raw[-48 - 72 : -48]).digest()
    assert not list(repo.backend.objects("keys"))
    assert repo.config["encryption"] == "none" and repo.config["key_id"] == 0


def test_envelopes_and_names(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", encryption="repokey", passphrase=PW)
    _store(repo, [os.urandom(100)])
    (idx,) = list((tmp_path / "r" / "index").iterdir())
    blob = idx.read_bytes()
    assert blob[:4] == ENVELOPE_MAGIC
    # the name is the keyed BLAKE3 of the plaintext index file: no unkeyed hash matches
    import blake3

    plain = repo.backend.load("index", idx.name)
    assert repo.sealer.digest(plain[:-32]).hex() == idx.name
    assert blake3.blake3(plain[:-32]).hexdigest() != idx.name
    assert isinstance(repo.sealer, Sealer)
    raw_backend = repo.backend.inner  # type: ignore[attr-defined]
    rep = check_ciphertext(raw_backend, repo.sealer.keys.verify_key, repo.sealer.key_id)
    assert rep.objects == 2 and not rep.problems


def test_unsealed_blob_refused(tmp_path: Path) -> None:
    """A plaintext pack dropped into an encrypted repository is not trusted."""
    enc = Repository.init(tmp_path / "e", encryption="repokey", passphrase=PW)
    plain = Repository.init(tmp_path / "p")
    name = _store(plain, [os.urandom(200)])
    src = tmp_path / "p" / "data" / name[:2] / name
    dst = tmp_path / "e" / "data" / name[:2]
    dst.mkdir(parents=True, exist_ok=True)
    (dst / name).write_bytes(src.read_bytes())
    with pytest.raises(CorruptionError, match=r"key|trailer"):
        read_pack_trailer(enc.backend, name)


def test_key_objects(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", encryption="repokey", passphrase=PW)
    (k,) = list((tmp_path / "r" / "keys").iterdir())
    body = json.loads(k.read_text())
    assert body["kdf"]["name"] == "scrypt" and len(bytes.fromhex(body["kdf"]["salt"])) == 16
    assert PW not in k.read_text()
    with pytest.raises(keys.WrongPassphrase):
        Repository.open(tmp_path / "r", "not it")
    assert Repository.open(tmp_path / "r", PW).seed == repo.seed
    # a key object of another repository (same passphrase) does not open this one
    other = Repository.init(tmp_path / "o", encryption="repokey", passphrase=PW)
    for f in (tmp_path / "r" / "keys").iterdir():
        f.unlink()
    (tmp_path / "r" / "keys" / "0123456789abcdef").write_bytes(
        next((tmp_path / "o" / "keys").iterdir()).read_bytes())
    with pytest.raises(RepositoryError):
        Repository.open(tmp_path / "r", PW)
    assert other.sealer.key_id != repo.sealer.key_id


def test_master_roundtrip() -> None:
    m = MasterKeys.generate()
    assert MasterKeys.from_bytes(m.to_bytes()) == m
    text = keys.export_master(m, "repo-id")
    assert keys.import_master(text, "repo-id") == m
    with pytest.raises(UsageError, match=r"another repository|damaged"):
        keys.import_master(text, "other-id")
    obj = keys.wrap(m, "a", "repo-id")
    assert keys.unwrap(obj, "a", "repo-id") == m
    assert keys.unwrap(obj, "b", "repo-id") is None
    assert keys.unwrap(obj, "a", "other-id") is None
