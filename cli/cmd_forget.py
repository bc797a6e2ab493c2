"""``snapferry forget``: remove restore points by id or by a retention policy."""

from __future__ import annotations

import argparse
from typing import TypeVar

from snapferry.cli.cmd_prune import print_prune
from snapferry.cli.common import epilog
from snapferry.cli.output import emit_json

_P = TypeVar("_P", bound=argparse.ArgumentParser)
HELP = "remove restore points by id or by a --keep-* retention policy"
EXAMPLES = """
  snapferry forget --keep-daily 7 --keep-weekly 4 --keep-monthly 3 --dry-run
  snapferry forget --vm web1 --keep-last 10 --keep-within 30d --prune
  snapferry forget 20261125T193924Z-3f9a0c1e --json
"""
NOTES = """notes:
  Policies apply to each series (VM / --name) on its own; a restore point kept by any
  rule stays. Rules: docs/RETENTION.md. Takes the repository's exclusive role."""


def add_parser(sub: argparse._SubParsersAction[_P]) -> _P:
    """The command's parser; the caller adds the global --repo and --json."""
    p = sub.add_parser("forget", help=HELP, description=HELP + " (docs/RETENTION.md).",
                       epilog=epilog(EXAMPLES, NOTES))
    p.add_argument("backup_ids", nargs="*", metavar="BACKUP_ID",
                   help="restore points to remove (ids or unique prefixes)")
    p.add_argument("--keep-last", type=int, default=0, metavar="N",
                   help="keep the N newest points (-1: all; default: %(default)s)")
    for unit, span in (("hourly", "hours"), ("daily", "days"), ("weekly", "ISO weeks"),
                       ("monthly", "months"), ("yearly", "years")):
        p.add_argument(f"--keep-{unit}", type=int, default=0, metavar="N",
                       help=f"keep the newest point of each of the N newest {span} (UTC) "
                       "that hold one (default: %(default)s)")
    p.add_argument("--keep-within", metavar="DURATION",
                   help="keep every point within DURATION (e.g. 7d, 1y6m, 36h) of the newest")
    p.add_argument("--vm", metavar="NAME", help="only the restore points of this VM/name")
    p.add_argument("--dry-run", action="store_true", help="show the decisions, change nothing")
    p.add_argument("--prune", action="store_true", help="run prune afterwards (same lock)")
    p.add_argument("--max-unused", type=float, default=None, metavar="PERCENT",
                   help="with --prune: repack packs more unused than this (default 5)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from snapferry.cli.common import open_repo
    from snapferry.engine.forget import forget
    from snapferry.engine.retention import Policy, parse_duration
    from snapferry.engine.store.prune import DEFAULT_MAX_UNUSED

    policy = Policy(
        last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily,
        weekly=args.keep_weekly, monthly=args.keep_monthly, yearly=args.keep_yearly,
        within=parse_duration(args.keep_within) if args.keep_within else None,
    )
    repo = open_repo(args)
    res = forget(
        repo, policy=policy, backup_ids=args.backup_ids, vm=args.vm, dry_run=args.dry_run,
        then_prune=args.prune,
        max_unused=DEFAULT_MAX_UNUSED if args.max_unused is None else args.max_unused,
    )
    if args.json:
        emit_json({"repository": repo.backend.location, **res.to_json()})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"policy: {res.policy}")
    w = max([4, *(len(d.point.group) for d in res.decisions)])  # whole names, aligned
    print(f"{'BACKUP_ID':26} {'NAME':{w}}  {'CREATED (UTC)':20} {'ACTION':7} REASONS")
    for d in res.decisions:
        print(f"{d.point.backup_id:26} {d.point.group:{w}}  "
              f"{d.point.created.strftime('%Y-%m-%d %H:%M:%S'):20} "
              f"{'keep' if d.keep else 'remove':7} {', '.join(d.reasons) or '-'}")
    for name, why, rm in res.damaged:
        print(f"{name:26} {'?':{w}}  {'?':20} {'remove' if rm else 'keep':7} damaged: {why}")
    n = sum(not d.keep for d in res.decisions) + sum(rm for _n, _w, rm in res.damaged)
    print(f"{verb} {n} restore point(s), kept {len(res.kept)}")
    if res.prune is not None:
        print_prune(res.prune)
    return 0
