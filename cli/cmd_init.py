"""``snapferry init``: create a repository."""

from __future__ import annotations

import argparse

from snapferry.cli.common import REPO_ENV, epilog, parse_size
from snapferry.cli.output import emit_json, human_bytes
from snapferry.engine.repo_defaults import DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL

HELP = "create a repository"
EXAMPLES = """
  snapferry init /backup/repo
  snapferry init /backup/repo --chunk-size 1M
  snapferry init /backup/repo --compression 9      # smaller, slower backups
  snapferry init /backup/repo --password-file /root/repo.pass   # encrypted (the default)
  snapferry init /backup/lab --encryption none     # plaintext
  SNAPFERRY_REPO=/backup/repo snapferry init
  snapferry init s3://backups/site-a --s3-endpoint http://127.0.0.1:7480
"""
NOTES = """notes:
  Only the last path component is created: the parent folder must exist.
  S3: s3://BUCKET/PREFIX with --s3-endpoint URL (or $SNAPFERRY_S3_ENDPOINT) and the
  usual AWS credentials; a missing bucket is created. sftp: and rest: are planned."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help=HELP, description=HELP + ".",
                       epilog=epilog(EXAMPLES, NOTES))
    p.add_argument("path", metavar="REPO", nargs="?", default=None,
                   help=f"the new repository's directory (default: --repo or ${REPO_ENV})")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                   help="chunk size, a power of two from 64K to 4M "
                        f"(default: {human_bytes(DEFAULT_CHUNK_SIZE)})")
    p.add_argument("--compression", type=int, default=DEFAULT_ZSTD_LEVEL, metavar="LEVEL",
                   help="zstd level 1..19 for new chunks: 19 stores least and is slowest "
                        "(default: %(default)s; table in docs/chunk-size.md)")
    from snapferry.cli.cmd_key import add_init_options

    add_init_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from snapferry.cli.common import repo_location
    from snapferry.engine.location import check_new_location, parse_location
    from snapferry.engine.store.repo import Repository

    loc = parse_location(args.path) if args.path else repo_location(args)
    check_new_location(loc)
    from snapferry.cli.cmd_key import init_encryption

    encryption, passphrase = init_encryption(args)
    repo = Repository.init(loc.target, chunk_size=args.chunk_size, zstd_level=args.compression,
                           encryption=encryption, passphrase=passphrase)
    where = repo.backend.location
    if args.json:
        emit_json({"repository": where, "id": repo.id, "chunk_size": repo.chunk_size,
                   "zstd_level": repo.zstd_level, "format": repo.config.get("format"),
                   "encryption": encryption})
    else:
        print(f"initialised repository {where} (chunk size {human_bytes(repo.chunk_size)}, "
              f"encryption {encryption})")
    return 0
