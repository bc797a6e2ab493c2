"""Key objects (``keys/<name>``), passphrases and exported keys (docs/FORMAT.md, *Encryption*).

Each ``keys/`` object wraps the repository's one master key set (``MasterKeys``) under
one passphrase: scrypt(passphrase, salt, n, r, p) -> a 32-byte wrapping key ->
AES-256-GCM over the master key bytes, the associated data naming the repository id
and the key id. Several key objects (several passphrases) unlock the same master key.

The passphrase comes from ``SNAPFERRY_PASSWORD``, then a password file
(``--password-file`` or ``SNAPFERRY_PASSWORD_FILE``), then a prompt when stdin is a
terminal; never from the command line, and it is never logged or printed.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import secrets
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from snapferry.engine import kdf as _ahead
from snapferry.engine.errors import CorruptionError, RepositoryError, UsageError
from snapferry.engine.store.backend import Backend, ObjectMissing
from snapferry.engine.store.crypto import MasterKeys, Sealer

PASSWORD_ENV = _ahead.PASSWORD_ENV
PASSWORD_FILE_ENV = _ahead.PASSWORD_FILE_ENV
KEY_KIND = _ahead.KEY_KIND
EXPORT_KIND = "snapferry-master-key"
VERIFY_KIND = "snapferry-verification-key"
SCRYPT_N = 1 << 15  # 32 MiB with r=8: about 0.1 s on one core
SCRYPT_R = 8
SCRYPT_P = 1
TEST_SCRYPT_ENV = "SNAPFERRY_TEST_SCRYPT_N"
"""Test-only: a smaller scrypt ``n`` (never set in production; readers take n from the key)."""


class WrongPassphrase(RepositoryError):
    """No key object of the repository opens with this passphrase."""


_password_file: str | None = None


def set_password_file(path: str | None) -> None:
    """Where the CLI's ``--password-file`` points (read when a passphrase is needed)."""
    global _password_file
    _password_file = path


_read_password_file = _ahead.read_password_file


def passphrase(*, new: bool = False, prompt: str = "passphrase") -> str:
    """The passphrase from the environment, a password file or the terminal."""
    given = _ahead.given_passphrase(_password_file)
    if given is not None:
        return given
    if not sys.stdin.isatty():
        raise UsageError(
            f"this repository is encrypted: give its passphrase in ${PASSWORD_ENV}, "
            f"with --password-file FILE or ${PASSWORD_FILE_ENV}, or run on a terminal"
        )
    pw = getpass.getpass(f"snapferry {prompt}: ")
    if new:
        again = getpass.getpass(f"snapferry {prompt} (again): ")
        if again != pw:
            raise UsageError("the two passphrases differ")
    if not pw:
        raise UsageError("empty passphrase")
    return pw


def new_passphrase(path: str | None = None, prompt: str = "new passphrase") -> str:
    """A new passphrase (``key add``/``passwd``): from ``path`` when given, else as above."""
    if path:
        return _read_password_file(path)
    if sys.stdin.isatty() and not os.environ.get("SNAPFERRY_NEW_PASSWORD"):
        return passphrase(new=True, prompt=prompt)
    env = os.environ.get("SNAPFERRY_NEW_PASSWORD")
    if env:
        return env
    raise UsageError("give the new passphrase with --new-password-file FILE or "
                     "$SNAPFERRY_NEW_PASSWORD, or run on a terminal")


# -- key objects ---------------------------------------------------------------------------


def _kdf(pw: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """scrypt, 32 bytes; taken from ``engine/kdf.py`` when the command started it ahead
    (in a thread, while the store's modules loaded)."""
    return _ahead.scrypt(pw, salt, n, r, p)


def _wrap_aad(repo_id: str, key_id: int) -> bytes:
    return f"snapferry-key/{repo_id}/{key_id:08x}".encode()


def wrap(master: MasterKeys, pw: str, repo_id: str, label: str = "") -> dict[str, Any]:
    """A key object (JSON dict) holding ``master`` under ``pw``."""
    n = int(os.environ.get(TEST_SCRYPT_ENV, SCRYPT_N))
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    wk = _kdf(pw, salt, n, SCRYPT_R, SCRYPT_P)
    ct = AESGCM(wk).encrypt(nonce, master.to_bytes(), _wrap_aad(repo_id, master.key_id))
    return {
        "format": 2,
        "kind": KEY_KIND,
        "repository": repo_id,
        "key_id": master.key_id,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "label": label,
        "kdf": {"name": "scrypt", "n": n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex()},
        "aead": "aes-256-gcm",
        "nonce": nonce.hex(),
        "wrapped": ct.hex(),
    }


def unwrap(obj: dict[str, Any], pw: str, repo_id: str) -> MasterKeys | None:
    """The master key of a key object, or None when ``pw`` does not open it."""
    try:
        params = _ahead.valid_params(obj["kdf"])
        if params is None or obj["aead"] != "aes-256-gcm":
            return None
        salt, n, r, p = params
        wk = _kdf(pw, salt, n, r, p)
        raw = AESGCM(wk).decrypt(
            bytes.fromhex(obj["nonce"]), bytes.fromhex(obj["wrapped"]),
            _wrap_aad(repo_id, int(obj["key_id"])),
        )
    except (KeyError, TypeError, ValueError, InvalidTag):
        return None
    try:
        keys = MasterKeys.from_bytes(raw)
    except CorruptionError:
        return None
    return keys if keys.key_id == int(obj["key_id"]) else None


@dataclass
class KeyObject:
    name: str
    body: dict[str, Any]


def key_objects(backend: Backend) -> list[KeyObject]:
    out: list[KeyObject] = []
    for info in sorted(backend.objects("keys"), key=lambda i: i.name):
        try:
            body = json.loads(backend.load("keys", info.name))
        except (ObjectMissing, ValueError, UnicodeDecodeError):
            continue
        if isinstance(body, dict) and body.get("kind") == KEY_KIND:
            out.append(KeyObject(info.name, body))
    return out


def save_key_object(backend: Backend, body: dict[str, Any]) -> str:
    while True:
        name = secrets.token_hex(8)
        if backend.save("keys", name, (json.dumps(body, indent=1) + "\n").encode()):
            return name


def unlock(backend: Backend, config: dict[str, Any], pw: str | None = None) -> tuple[Sealer, str]:
    """(sealer, name of the key object that opened) for an encrypted repository."""
    objs = key_objects(backend)
    if not objs:
        raise RepositoryError(
            f"repository {backend.location} is encrypted but holds no key (keys/ is empty)"
        )
    if pw is None:
        pw = passphrase()
    want = int(config.get("key_id", 0))
    for ko in objs:
        if int(ko.body.get("key_id", -1)) != want:
            continue
        master = unwrap(ko.body, pw, str(config["id"]))
        if master is not None:
            return Sealer(master), ko.name
    raise WrongPassphrase(f"wrong passphrase for repository {backend.location}")


# -- exported keys -----------------------------------------------------------------------


def export_master(master: MasterKeys, repo_id: str) -> str:
    """The paper backup: every key in hex, plus a check value (keep it safe: it decrypts)."""
    raw = master.to_bytes()
    body = {
        "kind": EXPORT_KIND,
        "repository": repo_id,
        "key_id": master.key_id,
        "master": raw.hex(),
        "check": hashlib.blake2b(raw, digest_size=4).hexdigest(),
    }
    return json.dumps(body, indent=1) + "\n"


def import_master(text: str, repo_id: str) -> MasterKeys:
    try:
        body = json.loads(text)
        raw = bytes.fromhex(body["master"].replace(" ", ""))
        ok = body["kind"] == EXPORT_KIND and body["repository"] == repo_id
        ok = ok and hashlib.blake2b(raw, digest_size=4).hexdigest() == body["check"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError("not an exported snapferry master key") from None
    if not ok:
        raise UsageError("that exported key is damaged or belongs to another repository")
    return MasterKeys.from_bytes(raw)


@dataclass(frozen=True)
class VerificationKey:
    repository: str
    key_id: int
    key: bytes


def export_verification(master: MasterKeys, repo_id: str) -> str:
    body = {"kind": VERIFY_KIND, "repository": repo_id, "key_id": master.key_id,
            "verify_key": master.verify_key.hex()}
    return json.dumps(body, indent=1) + "\n"


def load_verification(path: str) -> VerificationKey:
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
        if body["kind"] not in (VERIFY_KIND, EXPORT_KIND):
            raise ValueError
        if body["kind"] == EXPORT_KIND:
            mk = MasterKeys.from_bytes(bytes.fromhex(body["master"]))
            return VerificationKey(str(body["repository"]), mk.key_id, mk.verify_key)
        key = bytes.fromhex(body["verify_key"])
        if len(key) != 32:
            raise ValueError
        return VerificationKey(str(body["repository"]), int(body["key_id"]), key)
    except OSError as e:
        raise UsageError(f"cannot read verification key {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, CorruptionError):
        raise UsageError(f"{path} is not a snapferry verification key") from None
