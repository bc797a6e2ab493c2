"""``snapferry backup``: back up a disk image, an NBD export or a VM.

VM sources (``qemu+unix://``, ``vsphere://``, ``libvirt://``, ``lab``) go to
``snapferry.cli.vm`` (passed in by ``main`` as ``vm_backup``); images and NBD exports are
handled here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from snapferry.cli.common import (
    DEFAULT_AUDIT_PERCENT,
    derive_key_ahead,
    epilog,
    non_negative_int,
    open_repo,
    parse_percent,
    sigterm_as_interrupt,
)
from snapferry.cli.output import emit_json, human_bytes, make_progress
from snapferry.engine.errors import UsageError

FILE_DISK_NAME = "disk"
HELP = "back up a disk image, an NBD export or a VM"
EXAMPLES = """
  snapferry backup vm1.qcow2 --repo /backup/repo          # read as the disk it holds
  snapferry backup /dev/vg0/data --name data
  snapferry backup 'nbd+unix:///?socket=/run/disk.sock' --name disk1 --bitmap b0
  snapferry backup 'qemu+unix:///run/vm1/qmp.sock?agent=/run/vm1/qga.sock'
  snapferry backup lab --mode full --json
  snapferry backup disk.raw --verify full                 # read new packs back too
"""
NOTES = """sources:
  disk.raw, vm.qcow2, /dev/vg/lv     an image file (any format qemu-img knows) or device
  nbd://HOST[:PORT]/EXPORT           an NBD export (also nbds://, nbd+unix:///?socket=)
  qemu+unix:///QMP?agent=QGA         a running QEMU VM: its QMP socket and guest agent
  vsphere://USER@HOST/VM             a vSphere VM (docs/VSPHERE.md)
  libvirt:///system/DOMAIN           a libvirt domain (also qemu:///system/DOMAIN)
  lab                                the lab VM (snapferry lab up)"""

VmBackup = Callable[[argparse.Namespace], int]
_vm_backup: VmBackup | None = None


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], vm_backup: VmBackup | None
) -> None:
    global _vm_backup
    _vm_backup = vm_backup
    p = sub.add_parser("backup", help=HELP, description=HELP + ".",
                       epilog=epilog(EXAMPLES, NOTES))
    p.add_argument("source", metavar="SOURCE",
                   help="what to back up: an image, a device, an NBD URI or a VM (below)")
    p.add_argument("--name", help="the series the restore points are filed under "
                                  "(default: the source's identity, HOST:/abs/path or the "
                                  "NBD URI; a VM's name)")
    p.add_argument("--workers", type=non_negative_int, default=0, metavar="N",
                   help="reader worker processes (default: 0, one per CPU)")
    p.add_argument("--verify", choices=("full", "quick"), default="quick",
                   help="pre-commit check (default: quick): quick checks that every pack "
                        "this backup wrote is in the repository; full also reads each back "
                        "and re-hashes its chunks (schedule `snapferry verify --read-data` "
                        "to check the medium)")
    p.add_argument("--bitmap", metavar="NAME",
                   help="NBD or qcow2 image: the dirty bitmap an incremental reads")
    p.add_argument("--source-format", metavar="FMT", default=None,
                   help="image files: the format (raw, qcow2, ...; default: probed with "
                        "qemu-img)")
    p.add_argument("--parent", metavar="BACKUP_ID",
                   help="chain to this restore point (default: the latest of the series)")
    p.add_argument("--mode", choices=("auto", "full", "incremental"), default="auto",
                   help="auto: incremental when possible; full: read everything; "
                        "incremental: fail if it cannot be one")
    p.add_argument("--audit", type=parse_percent, default=DEFAULT_AUDIT_PERCENT,
                   metavar="PERCENT",
                   help="incrementals: re-read this share of the chunks the changed-block "
                        "tracker calls clean and check them against the parent (default: "
                        "%(default)s; 0 turns the audit off)")
    p.add_argument("--quiesce", choices=("required", "preferred", "off"), default="preferred",
                   help="VM sources: guest filesystem freeze policy")
    p.add_argument("--retries", type=non_negative_int, default=1, metavar="N",
                   help="VM sources: quiesce retries")
    p.add_argument("--qemu-strategy", choices=("overlay", "fleecing"), default="overlay",
                   help="QEMU: overlay + block-commit, or fleecing (copy-before-write, no "
                        "commit phase)")
    p.add_argument("--vddk-libdir", metavar="DIR", help="vSphere: VDDK library directory")
    p.add_argument("--transport", choices=("vddk", "nbd"), default=None,
                   help="vSphere: read disks through VDDK or nbdkit's vddk plugin "
                        "(default: the URI's transport=, else vddk)")
    p.add_argument("--vddk-transports", metavar="MODES",
                   help="vSphere: VDDK transport modes, e.g. nbdssl:nbd or hotadd:nbdssl")
    p.add_argument("--nbd-uri", metavar="URI",
                   help="vSphere --transport nbd: the nbdkit vddk export per disk; may use "
                        "{disk} {index} {file} {snapshot} {vm}")
    p.set_defaults(func=run)


def source_kind(source: str) -> str:
    """``vm`` (through the coordinator), ``nbd``, ``file`` or ``other``."""
    from snapferry.engine.sources import NBD_SCHEMES, scheme_of
    from snapferry.engine.targets import is_vm_target

    if source == "lab" or is_vm_target(source):  # the lab: resolved by cli/vm.py
        return "vm"
    scheme = scheme_of(source)
    if scheme is None:
        return "file"
    if scheme in NBD_SCHEMES:
        return "nbd"
    return "other"


def run(args: argparse.Namespace) -> int:
    derive_key_ahead(args)  # the passphrase's scrypt runs while the store and sources load
    kind = source_kind(args.source)
    repo = None  # opened once: an encrypted repository's key costs a scrypt each time
    if args.parent:
        from snapferry.engine.restore_point_ref import resolve_restore_point

        repo = open_repo(args)
        args.parent = resolve_restore_point(repo, args.parent)
    if kind == "vm":
        if _vm_backup is None:
            raise UsageError(f"VM sources ({args.source}) are not available in this build")
        return int(_vm_backup(args))
    if args.source_format is not None and kind != "file":
        raise UsageError("--source-format is for image files, not NBD exports")
    from snapferry.engine.sources import open_source

    if repo is None:
        repo = open_repo(args)
    progress = make_progress(args.json)
    with sigterm_as_interrupt():
        src = open_source(args.source, bitmap=args.bitmap, image_format=args.source_format)
        try:
            desc = src.describe()
            result = backup_plain(repo, args, src, kind, progress)
        finally:
            progress.finish()  # clear the bar before any error line
            src.close()
    if args.json:
        doc = result.to_json()
        doc["repository"] = repo.backend.location
        doc.setdefault("quiesced", None)
        doc.setdefault("freeze_ms", None)
        doc.setdefault("warnings", [])
        emit_json(doc)
    else:
        print(summary(result, desc))
    return 0


def summary(result: Any, desc: dict[str, Any] | None = None) -> str:
    """The human summary of a file or NBD backup: one line, plus one per disk beyond one."""
    disks = result.disks
    what = f" ({desc['format']} image)" if desc and desc.get("kind") == "image" else ""
    head = f"{result.mode} backup {result.backup_id} of {result.vm}{what}"
    if len(disks) == 1:
        d = disks[0]
        return (
            f"{head}: read {human_bytes(d.bytes_read)} of {human_bytes(d.virtual_size)}, "
            f"stored {human_bytes(d.bytes_stored)} ({d.chunks_new} new, {d.chunks_reused} "
            f"reused chunks) in {result.seconds:.1f} s"
            + (f" [full: {d.full_reason}]" if d.full_reason else "")
        )
    lines = [f"{head} in {result.seconds:.1f} s"]
    for d in disks:
        lines.append(
            f"  {d.name}: read {human_bytes(d.bytes_read)} of {human_bytes(d.virtual_size)}, "
            f"stored {human_bytes(d.bytes_stored)} ({d.chunks_new} new, "
            f"{d.chunks_reused} reused chunks)"
        )
    return "\n".join(lines)


def backup_plain(repo: Any, args: argparse.Namespace, src: Any, kind: str, progress: Any) -> Any:
    """A file, image or NBD backup: engine/planning.py picks the series, the parent and
    full vs incremental; the CLI only passes the user's words on."""
    from snapferry.engine.backup import BackupOptions, run_backup
    from snapferry.engine.planning import plan_plain_backup

    plan = plan_plain_backup(repo, src, name=args.name, bitmap=args.bitmap,
                             mode=args.mode, parent_id=args.parent)
    for w in plan.warnings:
        progress.note(f"warning: {w}")
    options = BackupOptions(
        workers=args.workers,
        verify=args.verify,
        parent=plan.parent.backup_id if plan.parent is not None else None,
        progress=progress,
        no_parent=plan.parent is None,
        audit=args.audit,
        identity=plan.identity,
    )
    consistency = "n/a" if kind == "file" else "crash"
    result = run_backup(repo, plan.name, [plan.disk], options, consistency=consistency)
    result.warnings[:0] = plan.warnings
    return result
