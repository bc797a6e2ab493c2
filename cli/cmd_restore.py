"""``snapferry restore``: turn a restore point back into a disk image or onto a device."""

from __future__ import annotations

import argparse
from pathlib import Path

from snapferry.cli.common import epilog, non_negative_int, open_repo, sigterm_as_interrupt
from snapferry.cli.output import emit_json, human_bytes, make_progress

HELP = "turn a restore point back into a disk image (or onto a block device)"
EXAMPLES = """
  snapferry restore latest --to disk.raw
  snapferry restore latest:vm1 --disk vda --to vda.qcow2      # qcow2 from the name
  snapferry restore 20261125T19 --to /dev/vg0/restored --force  # a unique id prefix
"""
NOTES = """notes:
  The format follows the target's name unless --format is given: .qcow2 -> qcow2,
  .raw/.img/anything else -> raw; block devices take raw. A target that a running
  process holds open (a VM's disk image) is refused: pass --force-in-use only when you
  know that process will not write to it again."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("restore", help=HELP, description=HELP + ".",
                       epilog=epilog(EXAMPLES, NOTES))
    p.add_argument("backup_id", metavar="BACKUP_ID",
                   help="an id, a unique id prefix, latest, or latest:NAME")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="the image file to write, or a block device")
    p.add_argument("--disk", metavar="NAME",
                   help="which disk of a VM's restore point (default: its only disk)")
    p.add_argument("--format", choices=("raw", "qcow2"), default=None,
                   help="image format (default: from the --to name; raw)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing target file or a block device's contents")
    p.add_argument("--force-in-use", action="store_true",
                   help="write even though a running process holds the target open "
                        "(its later writes are lost)")
    p.add_argument("--workers", type=non_negative_int, default=0, metavar="N",
                   help="decode and write threads (default: 0: four per CPU up to 16 with "
                        "direct I/O, else one per CPU up to 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from snapferry.engine.restore_point_ref import resolve_restore_point
    from snapferry.engine.restore_target import restore_to

    repo = open_repo(args)
    bid = resolve_restore_point(repo, args.backup_id)
    progress = make_progress(args.json)
    with sigterm_as_interrupt():
        try:
            result = restore_to(repo, bid, to=Path(args.to), disk=args.disk, fmt=args.format,
                                force=args.force, force_in_use=args.force_in_use,
                                workers=args.workers, progress=progress)
        finally:
            progress.finish()
    if args.json:
        doc = result.to_json()
        doc["disk"] = {
            "name": result.disk,
            "virtual_size": result.virtual_size,
            "chunks": result.chunks,
            "zero_chunks": result.zero_chunks,
            "unique_chunks": result.unique_chunks,
            "bytes_written": result.bytes_written,
        }
        doc["repository"] = repo.backend.location
        emit_json(doc)
    else:
        print(
            f"restored {result.backup_id} of {result.vm} (disk {result.disk}, "
            f"{human_bytes(result.virtual_size)}) to {result.path} ({result.format}) "
            f"in {result.seconds:.1f} s"
        )
    return 0
