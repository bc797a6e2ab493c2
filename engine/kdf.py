"""The passphrase's scrypt, started ahead in a thread while the command loads the store.

Opening an encrypted repository derives the key that unwraps the master key with
scrypt (``engine/store/keys.py``: n = 2**15, r = 8; ~0.15 s of one core). Until now
that ran after the store's modules were imported (numpy, zstd, cryptography: ~0.3 s),
one after the other, at the start of every command: a fifth of a small incremental
backup. ``hashlib.scrypt`` releases the GIL, so ``derive_ahead`` starts it in a daemon
thread as the command begins, before those imports, and ``keys`` takes the result when
it unlocks (``scrypt``): the two overlap on two cores.

This module is light on purpose (no store import): the store's package import is what
it overlaps. It reads a *directory* repository's ``config`` and ``keys/*`` files
itself (best effort: anything unexpected, an S3 location, a passphrase that only a
prompt can give, and nothing is started); what it starts is a pure function of the
passphrase and each key object's salt and parameters, so a wrong guess costs one
wasted derivation in a thread, never a different key: ``keys`` checks every key
object as before (AEAD tag, key id).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from typing import Any

from snapferry.engine.errors import UsageError

PASSWORD_ENV = "SNAPFERRY_PASSWORD"
PASSWORD_FILE_ENV = "SNAPFERRY_PASSWORD_FILE"
MAXMEM = 256 << 20
KEY_KIND = "snapferry-key"
_MAX_KEY_OBJECTS = 8  # more than this (many passphrases): derive none ahead

Params = tuple[bytes, int, int, int]  # salt, n, r, p


def read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read password file {path}: {e.strerror}") from None
    pw = text.rstrip("\r\n")
    if not pw:
        raise UsageError(f"password file {path} is empty")
    return pw


def given_passphrase(password_file: str | None) -> str | None:
    """The passphrase from ``$SNAPFERRY_PASSWORD``, else the password file (the
    argument, else ``$SNAPFERRY_PASSWORD_FILE``); None when only a prompt can give it."""
    env = os.environ.get(PASSWORD_ENV)
    if env:
        return env
    path = password_file or os.environ.get(PASSWORD_FILE_ENV)
    if path:
        return read_password_file(path)
    return None


def valid_params(kdf: Any) -> Params | None:
    """(salt, n, r, p) of a key object's ``kdf`` field, or None when it is not a scrypt
    this snapferry runs (the bounds keep a crafted key object from asking for GiBs)."""
    try:
        if kdf["name"] != "scrypt":
            return None
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        salt = bytes.fromhex(kdf["salt"])
    except (KeyError, TypeError, ValueError):
        return None
    if n < 2 or n & (n - 1) or n > 1 << 22 or not 1 <= r <= 32 or not 1 <= p <= 16:
        return None
    return salt, n, r, p


class _Derivation:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.key: bytes | None = None


_lock = threading.Lock()
_ahead: dict[tuple[str, bytes, int, int, int], _Derivation] = {}


def _derive(pw: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(pw.encode(), salt=salt, n=n, r=r, p=p, maxmem=MAXMEM, dklen=32)


def scrypt(pw: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """scrypt(pw, salt, n, r, p), 32 bytes: the derivation started ahead for these
    inputs (waited for) when there is one, else computed here. A result is handed out
    once."""
    with _lock:
        d = _ahead.pop((pw, salt, n, r, p), None)
    if d is not None:
        d.done.wait()
        if d.key is not None:
            return d.key
    return _derive(pw, salt, n, r, p)


def _run(pw: str, salt: bytes, n: int, r: int, p: int, d: _Derivation) -> None:
    try:
        d.key = _derive(pw, salt, n, r, p)
    except Exception:  # the consumer derives it again and sees the error
        d.key = None
    finally:
        d.done.set()


def start(pw: str, params: Params) -> None:
    """Derive scrypt(pw, params) in a daemon thread (once per inputs)."""
    salt, n, r, p = params
    k = (pw, salt, n, r, p)
    with _lock:
        if k in _ahead:
            return
        d = _ahead[k] = _Derivation()
    threading.Thread(target=_run, args=(pw, salt, n, r, p, d), name="snapferry-kdf",
                     daemon=True).start()


def _local_key_params(root: str) -> list[Params]:
    """The scrypt inputs of the key objects of the directory repository at ``root``
    that can open its master key (its config's key id); [] when it is not encrypted
    or anything does not look as expected."""
    try:
        with open(os.path.join(root, "config"), "rb") as f:
            config = json.loads(f.read(1 << 20))
        if not isinstance(config, dict) or config.get("encryption", "none") == "none":
            return []
        want = int(config.get("key_id", 0))
        kdir = os.path.join(root, "keys")
        names = sorted(n for n in os.listdir(kdir) if not n.startswith("."))
        if len(names) > _MAX_KEY_OBJECTS:
            return []
        out: list[Params] = []
        for name in names:
            with open(os.path.join(kdir, name), "rb") as f:
                body = json.loads(f.read(1 << 20))
            if (isinstance(body, dict) and body.get("kind") == KEY_KIND
                    and int(body.get("key_id", -1)) == want):
                params = valid_params(body.get("kdf"))
                if params is not None:
                    out.append(params)
        return out
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def derive_ahead(location: str, password_file: str | None) -> None:
    """For a directory repository at ``location`` whose passphrase is given without a
    prompt: start the scrypt of each of its key objects. Never raises (the open that
    follows reports whatever is wrong)."""
    if "://" in location:
        return  # S3: its key objects are read through the backend, after the imports
    with contextlib.suppress(UsageError):
        pw = given_passphrase(password_file)
        if pw is None:
            return
        for params in _local_key_params(location):
            start(pw, params)
