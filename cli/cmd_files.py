"""``snapferry files``: list and copy files out of a restore point (ext2/3/4).

    snapferry files BACKUP_ID [--disk NAME] ls PATH
    snapferry files BACKUP_ID [--disk NAME] get PATH --to DEST
"""

from __future__ import annotations

import argparse
import stat
from collections.abc import Callable
from pathlib import Path

from snapferry.cli.common import epilog
from snapferry.cli.output import emit_json
from snapferry.engine.errors import UsageError

NAME = "files"
EXAMPLES = """
  snapferry files latest ls /etc
  snapferry files latest get /etc/hostname --to ./hostname
"""


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("files", help="list or copy files out of a restore point (ext2/3/4)",
                       epilog=epilog(EXAMPLES))
    p.add_argument("backup_id", metavar="BACKUP_ID")
    p.add_argument("action", choices=("ls", "get"))
    p.add_argument("path", metavar="PATH", help="absolute path inside the guest filesystem")
    p.add_argument("--to", metavar="DEST", help="get: where to write the file or directory")
    p.add_argument("--repo", metavar="REPO", help="repository path (default: $SNAPFERRY_REPO)")
    p.add_argument("--disk", metavar="NAME", help="disk of the restore point (default: the "
                                                   "only one)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return cmd_files


def cmd_files(args: argparse.Namespace) -> int:
    from snapferry.cli.cmd_serve import repo_path_of
    from snapferry.engine.serve.files import RestorePointFiles

    if args.action == "get" and not args.to:
        raise UsageError("files get needs --to DEST")
    if args.action == "ls" and args.to:
        raise UsageError("--to is for files get")
    with RestorePointFiles(repo_path_of(args), args.backup_id, args.disk,
                           password_file=getattr(args, "password_file", None)) as fs:
        if args.action == "ls":
            entries = fs.ls(args.path)
            if args.json:
                emit_json({"backup_id": args.backup_id, "disk": fs.export.disk,
                           "path": args.path, "entries": [e.to_json() for e in entries]})
            else:
                for e in entries:
                    size = "" if e.size is None else str(e.size)
                    print(f"{stat.filemode(e.mode)} {e.uid:>5} {e.gid:>5} {size:>12} {e.name}")
            return 0
        target = fs.get(args.path, Path(args.to))
    if args.json:
        emit_json({"backup_id": args.backup_id, "path": args.path, "to": str(target)})
    else:
        print(f"copied {args.path} to {target}")
    return 0
