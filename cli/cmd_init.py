"""``snapferry init``: create a repository."""

from __future__ import annotations

import argparse

from snapferry.cli.common import REPO_ENV, epilog, parse_size
from snapferry.cli.output import emit_json, human_bytes

HELP = "create a repository"
EXAMPLES = """
  snapferry init /backup/repo
  snapferry init /backup/repo --chunk-size 1M
  SNAPFERRY_REPO=/backup/repo snapferry init
"""
NOTES = """notes:
  Only the last path component is created: the parent folder must exist.
  Remote repositories (s3:, sftp:, rest:) are planned, not supported yet."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help=HELP, description=HELP + ".",
                       epilog=epilog(EXAMPLES, NOTES))
    p.add_argument("path", metavar="REPO", nargs="?", default=None,
                   help=f"the new repository's directory (default: --repo or ${REPO_ENV})")
    p.add_argument("--chunk-size", type=parse_size, default=256 << 10, metavar="SIZE",
                   help="chunk size, a power of two from 64K to 4M (default: 256K)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from snapferry.cli.common import repo_location
    from snapferry.engine.location import check_new_location, parse_location
    from snapferry.engine.store.repo import Repository

    loc = parse_location(args.path) if args.path else repo_location(args)
    check_new_location(loc)
    repo = Repository.init(loc.path, chunk_size=args.chunk_size)
    if args.json:
        emit_json({"repository": str(repo.path), "id": repo.id, "chunk_size": repo.chunk_size,
                   "zstd_level": repo.zstd_level, "format": repo.config.get("format")})
    else:
        print(f"initialised repository {repo.path} (chunk size {human_bytes(repo.chunk_size)})")
    return 0
