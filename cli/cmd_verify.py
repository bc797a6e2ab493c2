"""``snapferry verify``: check restore points and the chunks they use."""

from __future__ import annotations

import argparse

from snapferry.cli.common import epilog, open_repo
from snapferry.cli.output import emit_json, human_bytes, make_progress

HELP = "check restore points and the chunks they use"
EXAMPLES = """
  snapferry verify                       # every restore point: structure, chunk headers
  snapferry verify latest:vm1 --read-data  # decode and re-hash every chunk vm1 uses
  snapferry verify 20261125T19           # a unique id prefix
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("verify", help=HELP, description=HELP + ".",
                       epilog=epilog(EXAMPLES))
    p.add_argument("backup_id", nargs="?", metavar="BACKUP_ID",
                   help="one restore point: an id, a unique id prefix, latest or latest:NAME "
                        "(default: all)")
    p.add_argument("--read-data", action="store_true",
                   help="decode and re-hash every referenced chunk (reads all stored data)")
    from snapferry.cli.cmd_key import add_verify_options

    add_verify_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from snapferry.engine.errors import CorruptionError
    from snapferry.engine.restore_point_ref import resolve_restore_point
    from snapferry.engine.verify import verify_repo

    if args.verify_key_file:
        from snapferry.cli.cmd_key import verify_with_key
        from snapferry.cli.common import repo_path

        return verify_with_key(args, repo_path(args))
    repo = open_repo(args)
    bid = resolve_restore_point(repo, args.backup_id) if args.backup_id else None
    progress = make_progress(args.json)
    try:
        report = verify_repo(repo, bid, read_data=args.read_data, progress=progress)
    finally:
        progress.finish()
    from snapferry.engine.planning import audit_history

    vm = repo.load_manifest(bid).vm if bid else None
    audits = audit_history(repo.list_backups(vm))  # the series verified, or all
    if args.json:
        emit_json({**report.to_json(), "cbt_audit": [h.to_json() for h in audits]})
        return 0 if report.ok else CorruptionError.exit_code
    for note in report.notes:
        print(f"note: {note}")
    for h in audits:
        print(h.summary())
    for problem in report.problems:
        print(f"problem: {problem}")
    what = (f"data and structure, {human_bytes(report.bytes_read)} read" if args.read_data
            else "structure")
    if report.ok:
        print(
            f"ok: {len(report.backups_checked)} restore point(s), {report.chunks_checked} "
            f"chunks checked ({what}) in {report.seconds:.1f} s"
        )
        return 0
    bad = ", ".join(report.bad_backups) or "see above"
    raise CorruptionError(
        f"verify found {len(report.problems)} problem(s); damaged restore points: {bad}"
    )
