"""``snapferry key``: passphrases of an encrypted repository and exported keys.

``key list|add|remove|passwd|export|import``, plus the encryption options of ``init``
and the verification-key mode of ``verify`` (``add_init_options``, ``verify_with_key``),
which the command modules of ``init`` and ``verify`` call (``--password-file`` is a
global option: ``cli/common.py``). Passphrases never come from
the command line: ``$SNAPFERRY_PASSWORD``, ``--password-file`` or a terminal prompt; a
new one from ``--new-password-file``, ``$SNAPFERRY_NEW_PASSWORD`` or the terminal.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from snapferry.cli.output import emit_json
from snapferry.engine.errors import CorruptionError, RepositoryError, UsageError

ENCRYPTION_ENV = "SNAPFERRY_ENCRYPTION"
REPO_ENV = "SNAPFERRY_REPO"


def add_init_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encryption", choices=("repokey", "none"), default=None,
                   help="repokey: AES-256-GCM, the key in the repository wrapped by your "
                        "passphrase; none: plaintext (default: repokey, or "
                        "$SNAPFERRY_ENCRYPTION)")


def init_encryption(args: argparse.Namespace) -> tuple[str, str | None]:
    """(encryption, passphrase) for ``init``."""
    from snapferry.engine.store import keys

    enc = args.encryption or os.environ.get(ENCRYPTION_ENV) or "repokey"
    if enc not in ("repokey", "none"):
        raise UsageError(f"${ENCRYPTION_ENV} must be repokey or none, not {enc!r}")
    if enc == "none":
        return enc, None
    keys.set_password_file(getattr(args, "password_file", None))
    try:
        pw = keys.passphrase(new=True, prompt="passphrase for the new repository")
    except UsageError as e:
        raise UsageError(f"{e} (or choose --encryption none)") from None
    return enc, pw


def add_verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify-key-file", metavar="FILE",
                   help="encrypted repository: check every object's integrity with the "
                        "verification key in FILE (from `key export --verification`); "
                        "needs no passphrase and decrypts nothing")


def verify_with_key(args: argparse.Namespace, repo_path: str) -> int:
    """``verify --verify-key-file``: integrity of the ciphertext, no decryption."""
    import json

    from snapferry.engine.store import keys
    from snapferry.engine.store.crypto import check_ciphertext
    from snapferry.engine.store.repo import backend_at

    vk = keys.load_verification(args.verify_key_file)
    backend = backend_at(repo_path)
    try:
        config = json.loads(backend.load("config", "config"))
    except (RepositoryError, ValueError):
        raise RepositoryError(f"{repo_path} is not a snapferry repository") from None
    if config.get("encryption", "none") == "none":
        raise UsageError(f"repository {repo_path} is not encrypted: run verify without "
                         "--verify-key-file")
    if config.get("id") != vk.repository or config.get("key_id") != vk.key_id:
        raise UsageError(f"{args.verify_key_file} is the verification key of another repository")
    rep = check_ciphertext(backend, vk.key, vk.key_id)
    if args.json:
        emit_json({"repository": repo_path, "mode": "verification-key", "ok": not rep.problems,
                   "objects_checked": rep.objects, "bytes_checked": rep.bytes,
                   "problems": rep.problems, "damaged_objects": rep.damaged_objects,
                   "damaged_restore_points": rep.damaged_restore_points})
        return CorruptionError.exit_code if rep.problems else 0
    for problem in rep.problems:
        print(f"problem: {problem}")
    if not rep.problems:
        print(f"ok: {rep.objects} objects ({rep.bytes} bytes) authenticated with the "
              "verification key (ciphertext only: nothing decrypted)")
        return 0
    extra = ""
    if rep.damaged_restore_points:
        extra = "; damaged restore points: " + ", ".join(rep.damaged_restore_points)
    raise CorruptionError(
        f"verify found {len(rep.problems)} damaged object(s){extra}; which restore points "
        "use a damaged pack needs the passphrase (verify --read-data)"
    )


# -- the key command ---------------------------------------------------------------------


EXAMPLES = """
  snapferry key list --repo /backup/repo
  snapferry key add --new-password-file /root/second.pass
  snapferry key export --to /root/master-key.txt            # paper backup: keep it safe
  snapferry key export --verification --to verify.key       # for a checking-only host
  snapferry verify --read-data --verify-key-file verify.key # there: no passphrase needed
"""


def add_parser(sub: Any) -> None:
    from snapferry.cli.common import epilog

    help_ = "passphrases and exported keys of an encrypted repository"
    p = sub.add_parser("key", help=help_, description=help_ + ".", epilog=epilog(EXAMPLES))
    ksub = p.add_subparsers(dest="key_command", metavar="ACTION", parser_class=type(p))
    ksub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        # The global options again, after the ACTION; SUPPRESS: an option not given here
        # leaves what was given before the ACTION (snapferry key --repo R list).
        q.add_argument("--repo", metavar="REPO", default=argparse.SUPPRESS,
                       help=f"repository path (default: ${REPO_ENV})")
        q.add_argument("--password-file", metavar="FILE", default=argparse.SUPPRESS,
                       help="read the repository passphrase from FILE (else "
                            "$SNAPFERRY_PASSWORD or a prompt)")
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print one JSON object on stdout")

    common(ksub.add_parser("list", help="the key objects (one per passphrase)"))
    q = ksub.add_parser("add", help="add a passphrase for the same master key")
    common(q)
    q.add_argument("--new-password-file", metavar="FILE")
    q.add_argument("--label", default="", help="a note stored with the key object")
    q = ksub.add_parser("remove", help="remove one passphrase (never the last)")
    common(q)
    q.add_argument("name", metavar="KEY_NAME")
    q = ksub.add_parser("passwd", help="change the passphrase that opens the repository")
    common(q)
    q.add_argument("--new-password-file", metavar="FILE")
    q = ksub.add_parser("export", help="write the master key (paper backup) or, with "
                                       "--verification, only the verification key")
    common(q)
    q.add_argument("--verification", action="store_true",
                   help="only the verification key: checks integrity, cannot decrypt")
    q.add_argument("--to", required=True, metavar="FILE", help="file to create (mode 0600)")
    q = ksub.add_parser("import", help="add a passphrase from an exported master key "
                                       "(when every passphrase is lost)")
    common(q)
    q.add_argument("file", metavar="FILE")
    q.add_argument("--new-password-file", metavar="FILE")
    p.set_defaults(func=cmd_key)


def _repo_path(args: argparse.Namespace) -> str:
    path: str | None = getattr(args, "repo", None) or os.environ.get(REPO_ENV)
    if not path:
        raise UsageError(f"no repository given: use --repo REPO or set {REPO_ENV}")
    return path


def _write_new(path: str, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists; choose a new file") from None
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _out(args: argparse.Namespace, obj: dict[str, Any], text: str) -> int:
    if args.json:
        emit_json(obj)
    else:
        print(text)
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    import json

    from snapferry.engine.store import keys
    from snapferry.engine.store.crypto import Sealer
    from snapferry.engine.store.repo import Repository, backend_at

    path = _repo_path(args)
    action = args.key_command
    if action == "import":
        backend = backend_at(path)
        config = json.loads(backend.load("config", "config"))
        with open(args.file, encoding="utf-8") as f:
            master = keys.import_master(f.read(), str(config.get("id")))
        if master.key_id != config.get("key_id"):
            raise UsageError(f"{args.file} is the key of another repository")
        pw = keys.new_passphrase(args.new_password_file)
        name = keys.save_key_object(backend, keys.wrap(master, pw, str(config["id"]), "import"))
        return _out(args, {"added": name}, f"added key {name} (from {args.file})")
    keys.set_password_file(getattr(args, "password_file", None))
    repo = Repository.open(path)
    if not isinstance(repo.sealer, Sealer):
        raise UsageError(f"repository {path} is not encrypted (init --encryption repokey)")
    rbackend = repo.backend
    master = repo.sealer.keys
    rid = repo.id
    objs = keys.key_objects(rbackend)
    if action == "list":
        rows = [{"name": k.name, "key_id": f"{int(k.body.get('key_id', 0)):08x}",
                 "created": k.body.get("created"), "label": k.body.get("label", ""),
                 "kdf": f"scrypt n={k.body['kdf']['n']} r={k.body['kdf']['r']} "
                        f"p={k.body['kdf']['p']}"} for k in objs]
        text = "\n".join(f"{r['name']}  key {r['key_id']}  {r['created']}  {r['kdf']}"
                         f"{'  ' + r['label'] if r['label'] else ''}" for r in rows)
        return _out(args, {"keys": rows}, text)
    if action == "add":
        pw = keys.new_passphrase(args.new_password_file)
        name = keys.save_key_object(rbackend, keys.wrap(master, pw, rid, args.label))
        return _out(args, {"added": name}, f"added key {name}")
    if action == "remove":
        if args.name not in {k.name for k in objs}:
            raise UsageError(f"no key {args.name!r} (see snapferry key list)")
        if len(objs) <= 1:
            raise UsageError("refusing to remove the last key: the repository would be lost")
        rbackend.remove("keys", args.name)
        return _out(args, {"removed": args.name}, f"removed key {args.name}")
    if action == "passwd":
        _s, used = keys.unlock(rbackend, repo.config, keys.passphrase())
        pw = keys.new_passphrase(args.new_password_file)
        name = keys.save_key_object(rbackend, keys.wrap(master, pw, rid))
        rbackend.remove("keys", used)
        return _out(args, {"added": name, "removed": used},
                    f"passphrase changed: key {used} replaced by {name}")
    if action == "export":
        if args.verification:
            _write_new(args.to, keys.export_verification(master, rid))
            return _out(args, {"written": args.to, "kind": "verification"},
                        f"wrote the verification key to {args.to} (checks integrity, "
                        "cannot decrypt)")
        _write_new(args.to, keys.export_master(master, rid))
        return _out(args, {"written": args.to, "kind": "master"},
                    f"wrote the master key to {args.to}: it decrypts the repository without "
                    "a passphrase; print it and keep it offline")
    raise UsageError(f"unknown key action {action!r}")
