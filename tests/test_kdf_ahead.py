"""The passphrase's scrypt started ahead (engine/kdf.py): the open that follows takes
that result and opens the repository exactly as before; a wrong passphrase is still
refused; locations and passphrases it cannot read ahead start nothing. Real
repositories in temporary directories (scrypt n lowered with the test variable)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from snapferry.engine import kdf
from snapferry.engine.store import keys
from snapferry.engine.store.repo import Repository

PW = "pw for the kdf tests"


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(keys.TEST_SCRYPT_ENV, "1024")
    monkeypatch.delenv(keys.PASSWORD_ENV, raising=False)
    monkeypatch.delenv(keys.PASSWORD_FILE_ENV, raising=False)
    kdf._ahead.clear()


def started() -> int:
    return len(kdf._ahead)


def test_open_takes_the_derivation_started_ahead(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "r"
    made = Repository.init(root, encryption="repokey", passphrase=PW)
    monkeypatch.setenv(keys.PASSWORD_ENV, PW)
    kdf.derive_ahead(str(root), None)
    assert started() == 1
    (key,) = kdf._ahead
    assert key[0] == PW and key[2:] == (1024, keys.SCRYPT_R, keys.SCRYPT_P)
    repo = Repository.open(root)
    assert started() == 0  # taken (once) by the unlock
    assert repo.sealer.key_id == made.sealer.key_id and repo.seed == made.seed
    # the same result scrypt gives
    body = json.loads(next((root / "keys").iterdir()).read_text())
    salt = bytes.fromhex(body["kdf"]["salt"])
    want = hashlib.scrypt(PW.encode(), salt=salt, n=1024, r=8, p=1, maxmem=kdf.MAXMEM,
                          dklen=32)
    assert kdf.scrypt(PW, salt, 1024, 8, 1) == want


def test_wrong_passphrase_is_still_refused(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "r"
    Repository.init(root, encryption="repokey", passphrase=PW)
    monkeypatch.setenv(keys.PASSWORD_ENV, "not it")
    kdf.derive_ahead(str(root), None)
    assert started() == 1
    with pytest.raises(keys.WrongPassphrase):
        Repository.open(root)


def test_password_file_is_read_ahead(tmp_path: Path) -> None:
    root = tmp_path / "r"
    Repository.init(root, encryption="repokey", passphrase=PW)
    pwf = tmp_path / "pw"
    pwf.write_text(PW + "\n")
    kdf.derive_ahead(str(root), str(pwf))
    assert started() == 1
    keys.set_password_file(str(pwf))
    try:
        Repository.open(root)
    finally:
        keys.set_password_file(None)
    assert started() == 0


def test_nothing_started_when_it_cannot_be_read_ahead(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain"
    Repository.init(plain, encryption="none")
    enc = tmp_path / "enc"
    Repository.init(enc, encryption="repokey", passphrase=PW)
    kdf.derive_ahead(str(enc), None)  # a prompt would give the passphrase: none ahead
    monkeypatch.setenv(keys.PASSWORD_ENV, PW)
    kdf.derive_ahead(str(plain), None)  # not encrypted
    kdf.derive_ahead(str(tmp_path / "missing"), None)
    kdf.derive_ahead("s3://bucket/prefix", None)  # read through the backend, later
    kdf.derive_ahead(str(enc), str(tmp_path / "no-such-file"))  # env wins; fine
    assert started() == 1
    kdf._ahead.clear()
    monkeypatch.delenv(keys.PASSWORD_ENV)
    kdf.derive_ahead(str(enc), str(tmp_path / "no-such-file"))  # open() reports it
    (enc / "keys" / "bogus").write_text('{"kind": "snapferry-key", "kdf": {"n": 1}}')
    monkeypatch.setenv(keys.PASSWORD_ENV, PW)
    kdf.derive_ahead(str(enc), None)  # the bogus key object is skipped, the real one not
    assert started() == 1
    assert Repository.open(enc).sealer.encrypted


@pytest.mark.parametrize("command", ["list", "restore", "verify", "info"])
def test_read_commands_start_the_derivation_before_their_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    """restore, list, verify, info (and the other commands that open a repository first)
    start the scrypt before the command's own code runs (its store imports come first
    there), and the open takes that result: one derivation, in the thread."""
    import importlib

    from snapferry.cli import main as cli_main

    root = tmp_path / "r"
    Repository.init(root, encryption="repokey", passphrase=PW)
    monkeypatch.setenv(keys.PASSWORD_ENV, PW)
    events: list[str] = []
    real_derive, real_start = kdf._derive, kdf.start

    def derive(*a: object) -> bytes:
        events.append(f"derive in {threading.current_thread().name}")
        return real_derive(*a)  # type: ignore[arg-type]

    def start(*a: object) -> None:
        events.append("start")
        real_start(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(kdf, "_derive", derive)
    monkeypatch.setattr(kdf, "start", start)
    mod = importlib.import_module(f"snapferry.cli.cmd_{command}")
    real_run = mod.run

    def run(args: object) -> int:
        events.append("command")
        return int(real_run(args))

    monkeypatch.setattr(mod, "run", run)  # the parser is built per call: it takes this one
    extra = {"restore": ["no-such-point", "--to", str(tmp_path / "out.raw")],
             "verify": [], "list": [], "info": []}[command]
    code = cli_main.main([command, *extra, "--repo", str(root), "--json"])
    assert code == (1 if command == "restore" else 0), capsys.readouterr()
    assert events[0] == "start" and "command" in events, events
    assert [e for e in events if e.startswith("derive")] == ["derive in snapferry-kdf"]
    assert started() == 0
