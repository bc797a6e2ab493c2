"""Encryption at rest (docs/FORMAT.md, *Encryption*): the real CLI on real repositories.

Each test builds an encrypted repository with ``snapferry init --encryption repokey``,
backs up an image holding known strings, and checks what the repository shows, what
tampering does, and what the verification key alone can prove.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import blake3
import pytest
import xxhash
from conftest import assert_one_line_error, cli_env, run_cli

PASSWORD = "correct horse battery staple"
VM_NAME = "payroll-db-vm7"
SECRETS = [b"TOPSECRET-password-hash-0xC0FFEE", b"-----BEGIN OPENSSH PRIVATE KEY-----",
           b"customer_ledger_2026.sqlite"]
CHUNK = 64 << 10


def env(password: str = PASSWORD, **extra: str) -> dict[str, str]:
    # a small scrypt cost keeps the many opens of a test fast (readers take n from the key)
    return cli_env(SNAPFERRY_PASSWORD=password, SNAPFERRY_ENCRYPTION="repokey",
                   SNAPFERRY_TEST_SCRYPT_N="1024", **extra)


def ok(*args: str | os.PathLike[str], e: dict[str, str] | None = None) -> str:
    p = run_cli(*args, env=e if e is not None else env())
    assert p.returncode == 0, p.stderr
    return p.stdout


def make_image(path: Path, size: int = 4 << 20, seed: int = 7) -> None:
    """Random data with the known strings inside (chunks stored raw: incompressible),
    text holding them too (stored compressed), zeros."""
    rng = __import__("random").Random(seed)
    text = b"".join(s + b" lorem ipsum dolor sit amet\n" for s in SECRETS) * 400
    data = bytearray(rng.randbytes(size // 2))
    for i, s in enumerate(SECRETS):
        at = (2 * i + 1) * CHUNK + 1000
        data[at : at + len(s)] = s
    data += text
    data += bytes(size - len(data))
    path.write_bytes(bytes(data[:size]))


@pytest.fixture
def enc_repo(tmp_path: Path) -> tuple[Path, Path, str]:
    """(repo, image, backup id): one full backup of a known image, encrypted."""
    repo, img = tmp_path / "repo", tmp_path / "disk.raw"
    make_image(img)
    ok("init", repo, "--chunk-size", "64K", "--encryption", "repokey")
    out = json.loads(ok("backup", img, "--repo", repo, "--name", VM_NAME, "--json"))
    return repo, img, out["backup_id"]


def all_bytes(repo: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file())


def restore_ok(repo: Path, bid: str, to: Path) -> None:
    ok("restore", "--repo", repo, bid, "--to", to)


def test_roundtrip_and_dedup(enc_repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    repo, img, bid = enc_repo
    cfg = json.loads((repo / "config").read_text())
    assert cfg["encryption"] == "repokey" and cfg["key_id"] != 0
    assert cfg["seed"] == "0" * 16  # the real seed lives only in the wrapped key
    restore_ok(repo, bid, tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == img.read_bytes()
    # a second backup of the same image stores no chunk again (keyed ids still dedup)
    out = json.loads(ok("backup", img, "--repo", repo, "--name", VM_NAME, "--json"))
    assert out["disks"][0]["chunks_new"] == 0, out
    assert out["disks"][0]["chunks_reused"] > 0
    verify = json.loads(ok("verify", "--repo", repo, "--read-data", "--json"))
    assert verify["ok"] and len(verify["backups_checked"]) == 2


def test_nothing_in_the_clear(enc_repo: tuple[Path, Path, str]) -> None:
    """strings/grep of the whole repository: no VM or disk name, no file content, no
    plaintext digest or unkeyed id of any chunk."""
    repo, img, _bid = enc_repo
    blob = all_bytes(repo)
    names = [VM_NAME.encode(), b"disk.raw", str(img).encode()]
    for s in [*SECRETS, *names, b"lorem ipsum"]:
        assert s not in blob, s
    data = img.read_bytes()
    for off in range(0, len(data), CHUNK):
        chunk = data[off : off + CHUNK]
        if not chunk.strip(b"\0"):
            continue
        assert blake3.blake3(chunk).digest() not in blob
        assert xxhash.xxh3_128_digest(chunk, 0) not in blob
    # the same image in a plaintext repository shows them: the test can fail
    plain = repo.parent / "plain"
    ok("init", plain, "--chunk-size", "64K", "--encryption", "none")
    ok("backup", img, "--repo", plain, "--name", VM_NAME)
    pb = all_bytes(plain)
    assert VM_NAME.encode() in pb and SECRETS[0] in pb


def test_none_keeps_todays_format(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    ok("init", repo, "--encryption", "none", e=cli_env())
    cfg = json.loads((repo / "config").read_text())
    assert cfg["encryption"] == "none" and cfg["key_id"] == 0 and cfg["id_hash"] == "xxh3-128"
    assert not (repo / "keys").exists() or not list((repo / "keys").iterdir())


def test_default_is_repokey_and_needs_a_passphrase(tmp_path: Path) -> None:
    e = {k: v for k, v in cli_env().items() if k != "SNAPFERRY_ENCRYPTION"}
    line = assert_one_line_error(run_cli("init", tmp_path / "r", env=e))
    assert "passphrase" in line and "--encryption none" in line
    assert not (tmp_path / "r" / "config").exists()
    pwf = tmp_path / "pw"
    pwf.write_text("from a file\n")
    p = run_cli("init", tmp_path / "r2", "--password-file", pwf, "--json", env=e)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["encryption"] == "repokey"
    key = json.loads(next((tmp_path / "r2" / "keys").iterdir()).read_text())
    assert key["kdf"]["name"] == "scrypt" and key["kdf"]["n"] >= 1 << 15  # the real cost
    assert "from a file" not in p.stdout + p.stderr
    ok("list", "--repo", tmp_path / "r2", "--password-file", pwf, e=e)


def test_wrong_passphrase_writes_nothing(enc_repo: tuple[Path, Path, str]) -> None:
    repo, img, bid = enc_repo
    before = sorted((str(p), p.stat().st_size) for p in repo.rglob("*"))
    for args in (["list", "--repo", repo], ["backup", img, "--repo", repo],
                 ["verify", "--repo", repo], ["restore", "--repo", repo, bid, "--to",
                                                repo.parent / "x.raw"]):
        line = assert_one_line_error(run_cli(*args, env=env("wrong one")))
        assert "wrong passphrase" in line, line
        assert "wrong one" not in line
    assert sorted((str(p), p.stat().st_size) for p in repo.rglob("*")) == before
    assert not (repo.parent / "x.raw").exists()


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x40
    path.write_bytes(bytes(b))


def _packs(repo: Path) -> list[Path]:
    """The packs, largest first (the chunk packs before the small page pack)."""
    return sorted((p for p in (repo / "data").rglob("*") if p.is_file()),
                  key=lambda p: (-p.stat().st_size, p.name))


def _files(repo: Path, kind: str) -> list[Path]:
    return sorted(p for p in (repo / kind).iterdir() if p.is_file())


def test_tampered_blob(enc_repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    repo, _img, bid = enc_repo
    ok("key", "export", "--repo", repo, "--verification", "--to", tmp_path / "vk.json")
    pack = _packs(repo)[0]
    _flip(pack, 48 + 100)  # inside the first blob's ciphertext
    # the verification key alone (no passphrase) names the pack
    e = {k: v for k, v in env().items() if k != "SNAPFERRY_PASSWORD"}
    p = run_cli("verify", "--repo", repo, "--read-data", "--verify-key-file",
                tmp_path / "vk.json", "--json", env=e)
    assert p.returncode != 0
    rep = json.loads(p.stdout)
    assert rep["damaged_objects"] == [f"data/{pack.name}"], rep
    # with the passphrase verify names the restore point; restore refuses
    p = run_cli("verify", "--repo", repo, "--read-data", env=env())
    assert p.returncode != 0 and bid in p.stderr, p.stderr
    line = assert_one_line_error(run_cli("restore", "--repo", repo, bid, "--to",
                                         tmp_path / "o.raw", env=env()))
    assert "authentication failed" in line or "damaged" in line, line


def test_tampered_manifest_and_index(enc_repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    repo, _img, bid = enc_repo
    ok("key", "export", "--repo", repo, "--verification", "--to", tmp_path / "vk.json")
    manifest = repo / "snapshots" / bid
    _flip(manifest, 40)
    index = _files(repo, "index")[0]
    _flip(index, 30)
    p = run_cli("verify", "--repo", repo, "--read-data", "--verify-key-file",
                tmp_path / "vk.json", "--json", env=env())
    rep = json.loads(p.stdout)
    assert p.returncode != 0
    assert set(rep["damaged_objects"]) == {f"snapshots/{bid}", f"index/{index.name}"}, rep
    assert rep["damaged_restore_points"] == [bid]
    p = run_cli("verify", "--repo", repo, "--json", env=env())
    rep = json.loads(p.stdout)
    assert bid in rep["bad_backups"], rep
    assert any(index.name[:16] in q for q in rep["problems"]), rep["problems"]


def test_swapped_objects(tmp_path: Path) -> None:
    """Two manifests swapped, two index files swapped, two packs swapped: each found."""
    repo, img = tmp_path / "repo", tmp_path / "disk.raw"
    make_image(img)
    ok("init", repo, "--chunk-size", "64K", "--encryption", "repokey")
    a = json.loads(ok("backup", img, "--repo", repo, "--name", "vm-a", "--json"))["backup_id"]
    make_image(img, seed=8)
    b = json.loads(ok("backup", img, "--repo", repo, "--name", "vm-b", "--json"))["backup_id"]
    ok("key", "export", "--repo", repo, "--verification", "--to", tmp_path / "vk.json")

    def swap(x: Path, y: Path) -> None:
        tx, ty = x.read_bytes(), y.read_bytes()
        x.write_bytes(ty)
        y.write_bytes(tx)

    swap(repo / "snapshots" / a, repo / "snapshots" / b)
    i1, i2 = _files(repo, "index")[:2]
    swap(i1, i2)
    p1, p2 = _packs(repo)[:2]
    swap(p1, p2)
    p = run_cli("verify", "--repo", repo, "--read-data", "--verify-key-file",
                tmp_path / "vk.json", "--json", env=env())
    rep = json.loads(p.stdout)
    want = {f"snapshots/{a}", f"snapshots/{b}", f"index/{i1.name}", f"index/{i2.name}",
            f"data/{p1.name}", f"data/{p2.name}"}
    assert set(rep["damaged_objects"]) == want, rep
    # with the key: both restore points are damaged (their manifests do not open)
    p = run_cli("verify", "--repo", repo, "--json", env=env())
    rep = json.loads(p.stdout)
    assert {a, b} <= set(rep["bad_backups"]), rep


def test_swapped_blobs_inside_a_pack(enc_repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    """Two sealed blobs of the same length exchanged in place: their associated data
    (pack, offset, id) no longer matches, so both fail to open."""
    from snapferry.engine.store.crypto import SEAL_OVERHEAD

    repo, _img, bid = enc_repo
    pack = _packs(repo)[0]
    data = bytearray(pack.read_bytes())
    n = CHUNK + SEAL_OVERHEAD  # random chunks are stored raw: all the same length
    a, b = 48, 48 + n
    data[a : a + n], data[b : b + n] = data[b : b + n], data[a : a + n]
    pack.write_bytes(bytes(data))
    p = run_cli("verify", "--repo", repo, "--read-data", "--json", env=env())
    rep = json.loads(p.stdout)
    assert not rep["ok"] and bid in rep["bad_backups"]
    assert len(rep["problems"]) == 2 and all(bid in q for q in rep["problems"]), rep
    # restore skips the CRC (an unkeyed check); the AEAD tag still refuses the blob
    line = assert_one_line_error(run_cli("restore", "--repo", repo, bid, "--to",
                                         tmp_path / "o.raw", env=env()))
    assert "authentication failed" in line, line


def test_truncated_pack(enc_repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    repo, _img, bid = enc_repo
    ok("key", "export", "--repo", repo, "--verification", "--to", tmp_path / "vk.json")
    pack = _packs(repo)[0]
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size // 2)
    p = run_cli("verify", "--repo", repo, "--read-data", "--verify-key-file",
                tmp_path / "vk.json", env=env())
    assert p.returncode != 0 and pack.name[:16] in p.stdout, p.stdout
    p = run_cli("verify", "--repo", repo, "--json", env=env())
    rep = json.loads(p.stdout)
    assert bid in rep["bad_backups"], rep
    line = assert_one_line_error(run_cli("restore", "--repo", repo, bid, "--to",
                                         tmp_path / "o.raw", env=env()))
    assert pack.name[:16] in line or "damaged" in line or "missing" in line, line


def test_verification_key_cannot_decrypt(enc_repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    repo, _img, _bid = enc_repo
    ok("key", "export", "--repo", repo, "--verification", "--to", tmp_path / "vk.json")
    vk = json.loads((tmp_path / "vk.json").read_text())
    assert set(vk) == {"kind", "repository", "key_id", "verify_key"}
    assert (tmp_path / "vk.json").stat().st_mode & 0o077 == 0
    e = {k: v for k, v in env().items() if k != "SNAPFERRY_PASSWORD"}
    out = ok("verify", "--repo", repo, "--read-data", "--verify-key-file", tmp_path / "vk.json",
             e=e)
    assert out.startswith("ok: ")
    # the verification key is not a data key: it opens no manifest
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    m = next((repo / "snapshots").iterdir()).read_bytes()
    with pytest.raises(InvalidTag):
        AESGCM(bytes.fromhex(vk["verify_key"])).decrypt(m[16:28], m[28:-32], None)
    # a verification key of another repository is refused with one line
    other = tmp_path / "other"
    ok("init", other, "--encryption", "repokey")
    line = assert_one_line_error(run_cli("verify", "--repo", other, "--verify-key-file",
                                         tmp_path / "vk.json", env=e))
    assert "another repository" in line


def test_key_list_add_remove_passwd(enc_repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    repo, _img, _bid = enc_repo
    keys0 = json.loads(ok("key", "list", "--repo", repo, "--json"))["keys"]
    assert len(keys0) == 1
    added = json.loads(ok("key", "add", "--repo", repo, "--label", "ops", "--json",
                          e=env(SNAPFERRY_NEW_PASSWORD="second pass")))["added"]
    ok("list", "--repo", repo, e=env("second pass"))
    ok("list", "--repo", repo)  # the first still works
    line = assert_one_line_error(run_cli("key", "remove", "--repo", repo, "nosuchkey",
                                         env=env()))
    assert "no key" in line
    ok("key", "remove", "--repo", repo, keys0[0]["name"])
    assert_one_line_error(run_cli("list", "--repo", repo, env=env()))  # first is gone
    line = assert_one_line_error(run_cli("key", "remove", "--repo", repo, added,
                                         env=env("second pass")))
    assert "last key" in line
    newpw = tmp_path / "newpw"
    newpw.write_text("third pass\n")
    out = ok("key", "passwd", "--repo", repo, "--new-password-file", newpw, e=env("second pass"))
    assert "second pass" not in out and "third pass" not in out
    assert_one_line_error(run_cli("list", "--repo", repo, env=env("second pass")))
    ok("list", "--repo", repo, e=env("third pass"))
    assert len(json.loads(ok("key", "list", "--repo", repo, "--json",
                             e=env("third pass")))["keys"]) == 1


def test_export_import_master(enc_repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    """Every passphrase lost: the paper backup adds a new one."""
    repo, img, bid = enc_repo
    ok("key", "export", "--repo", repo, "--to", tmp_path / "mk.json")
    assert_one_line_error(run_cli("key", "export", "--repo", repo, "--to",
                                  tmp_path / "mk.json", env=env()))  # never overwrites
    for k in (repo / "keys").iterdir():
        k.unlink()  # the passphrase objects are gone
    line = assert_one_line_error(run_cli("list", "--repo", repo, env=env()))
    assert "no key" in line
    ok("key", "import", "--repo", repo, tmp_path / "mk.json",
       e=env(SNAPFERRY_NEW_PASSWORD="recovered"))
    ok("restore", "--repo", repo, bid, "--to", tmp_path / "o.raw", e=env("recovered"))
    assert hashlib.sha256((tmp_path / "o.raw").read_bytes()).digest() == hashlib.sha256(
        img.read_bytes()).digest()


def test_damaged_copy_is_recorded_and_healed(enc_repo: tuple[Path, Path, str],
                                             tmp_path: Path) -> None:
    """verify --read-data records the bad copy (a sealed damaged object); the next backup
    stores a fresh copy and restores of it come out whole."""
    repo, img, bid = enc_repo
    _flip(_packs(repo)[0], 48 + 200)
    p = run_cli("verify", "--repo", repo, "--read-data", env=env())
    assert p.returncode != 0 and bid in p.stderr
    damaged = _files(repo, "damaged")
    assert len(damaged) == 1 and b'"entries"' not in damaged[0].read_bytes()  # sealed
    out = json.loads(ok("backup", img, "--repo", repo, "--name", VM_NAME, "--json"))
    assert out["disks"][0]["chunks_new"] == 1, out
    ok("restore", "--repo", repo, out["backup_id"], "--to", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == img.read_bytes()


def test_killed_worker_leaves_no_restore_point(tmp_path: Path) -> None:
    """A worker SIGKILLed mid-backup of an encrypted repository: no manifest, and the
    next backup commits and verifies (leftovers are sealed packs no manifest uses)."""
    repo, img = tmp_path / "repo", tmp_path / "disk.raw"
    make_image(img, 32 << 20)  # four 8 MiB work items: the kill lands in the second
    ok("init", repo, "--chunk-size", "64K", "--encryption", "repokey")
    p = run_cli("backup", img, "--repo", repo, "--workers", "2",
                env=env(SNAPFERRY_FAULT="worker-kill=20"))
    assert p.returncode != 0
    assert not (repo / "snapshots").exists() or not list((repo / "snapshots").iterdir())
    out = json.loads(ok("backup", img, "--repo", repo, "--name", VM_NAME, "--json"))
    rep = json.loads(ok("verify", "--repo", repo, "--read-data", "--json"))
    assert rep["ok"] and rep["backups_checked"] == [out["backup_id"]]
    ok("restore", "--repo", repo, out["backup_id"], "--to", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == img.read_bytes()
