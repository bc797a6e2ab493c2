"""``snapferry list``: the restore points of a repository."""

from __future__ import annotations

import argparse

from snapferry.cli.common import epilog, open_repo
from snapferry.cli.output import emit_json, human_bytes, table
from snapferry.cli.shapes import restore_point_doc, short_time, source_text

HELP = "list restore points"
EXAMPLES = """
  snapferry list --repo /backup/repo
  snapferry --repo /backup/repo list --json | jq '.backups[-1].backup_id'
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("list", help=HELP, description=HELP + ", oldest first.",
                       epilog=epilog(EXAMPLES))
    p.add_argument("name", nargs="?", default=None, metavar="NAME",
                   help="only the restore points of this series (VM or image name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    backups = repo.list_backups(args.name)
    if args.json:
        emit_json({"repository": str(repo.path),
                   "backups": [restore_point_doc(m) for m in backups]})
        return 0
    if not backups:
        print("no restore points" + (f" of {args.name}" if args.name else ""))
        return 0
    rows = []
    for m in backups:
        stored = sum(d.bytes_stored for d in m.disks)
        rows.append([
            m.backup_id, m.vm, m.mode, m.consistency, str(len(m.disks)),
            human_bytes(m.logical_bytes), human_bytes(stored), short_time(m.created),
            source_text(m),
        ])
    print(table(["BACKUP_ID", "NAME", "MODE", "CONSISTENCY", "DISKS", "SIZE", "STORED",
                 "CREATED (UTC)", "SOURCE"], rows, right=("DISKS", "SIZE", "STORED")))
    return 0
