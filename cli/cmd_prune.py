"""``snapferry prune``: reclaim the space no restore point uses."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TypeVar

from snapferry.cli.common import epilog
from snapferry.cli.output import emit_json, human_bytes

if TYPE_CHECKING:  # the store (numpy, zstd, crypto) loads when a command runs, not at start
    from snapferry.engine.store.prune import PruneReport

_P = TypeVar("_P", bound=argparse.ArgumentParser)
HELP = "delete and repack packs no restore point needs; remove leftovers of killed backups"
EXAMPLES = """
  snapferry prune --dry-run
  snapferry prune --max-unused 20 --json
"""


def add_parser(sub: argparse._SubParsersAction[_P]) -> _P:
    """The command's parser; the caller adds the global --repo and --json."""
    p = sub.add_parser("prune", help=HELP, description=HELP + " (docs/FORMAT.md, Deleters).",
                       epilog=epilog(EXAMPLES))
    p.add_argument("--dry-run", action="store_true", help="show what would be freed; no lock, "
                   "no change")
    p.add_argument("--max-unused", type=float, default=None, metavar="PERCENT",
                   help="repack packs whose unused share is above PERCENT (default 5; 100: "
                   "only delete wholly unused packs)")
    p.set_defaults(func=run)
    return p


def print_prune(r: PruneReport) -> None:
    would = "would " if r.dry_run else ""
    print(f"restore points {r.restore_points}, blobs in use {r.blobs_referenced}")
    print(f"unreferenced   {human_bytes(r.unreferenced_bytes_before)} of "
          f"{human_bytes(r.bytes_before)}")
    print(f"packs          {r.packs_before} before: {would}delete {r.packs_deleted}, "
          f"{would}repack {r.packs_repacked}"
          + (f" ({r.blobs_copied} blobs, {human_bytes(r.bytes_copied)} copied into "
             f"{r.packs_written} new)" if not r.dry_run and r.packs_repacked else ""))
    if not r.dry_run:
        print(f"index files    {r.index_files_before} before: removed {r.index_files_removed}, "
              f"wrote {r.index_files_written}")
        print(f"leftovers      {r.temp_files_removed} temp file(s), {r.damaged_removed} "
              "damaged list(s) of deleted packs removed")
    for p in r.problems:
        print(f"problem: {p}")
    print(f"{would}free {human_bytes(max(0, r.bytes_freed))}"
          + (f" in {r.seconds:.1f} s" if not r.dry_run else ""))


def run(args: argparse.Namespace) -> int:
    from snapferry.cli.common import open_repo
    from snapferry.engine.store.prune import DEFAULT_MAX_UNUSED, prune

    repo = open_repo(args)
    rep = prune(repo, dry_run=args.dry_run,
                max_unused=DEFAULT_MAX_UNUSED if args.max_unused is None else args.max_unused)
    if args.json:
        emit_json({"repository": repo.backend.location, **rep.to_json()})
        return 0
    print_prune(rep)
    return 0
