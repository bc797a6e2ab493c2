"""CLI glue for VM sources (QEMU, the lab VM, vSphere) and the lab/demo commands.

No logic of its own: parse, build typed options, call ``engine``, print.
"""

from __future__ import annotations

import argparse
import sys

from snapferry.cli.output import emit_json, human_bytes, make_progress, print_fields
from snapferry.engine.errors import UsageError


def backup_vm(args: argparse.Namespace) -> int:
    from snapferry.cli.common import open_repo
    from snapferry.engine.coordinator import VmBackupOptions
    from snapferry.engine.coordinator import backup_vm as run
    from snapferry.engine.targets import TargetOptions, VsphereCliOptions, open_hypervisor

    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.retries < 0:
        raise UsageError("--retries must be >= 0")
    if args.bitmap:
        raise UsageError("--bitmap is for plain NBD sources; VM sources track changes themselves")
    repo = open_repo(args)
    progress = make_progress(args.json)
    topts = TargetOptions(
        qemu_strategy=getattr(args, "qemu_strategy", "overlay"),
        vsphere=VsphereCliOptions(
            vddk_libdir=args.vddk_libdir,
            transport=args.transport,
            nbd_uri=getattr(args, "nbd_uri", None),
            vddk_transports=getattr(args, "vddk_transports", None),
        ),
        progress=progress,
    )
    source = args.source
    if source == "lab":  # the lab is no engine target: the CLI resolves it
        from snapferry.lab.vm import lab_target

        source, topts.work_dir = lab_target()
    hv = open_hypervisor(source, topts)
    try:
        result = run(
            hv,
            repo,
            VmBackupOptions(
                mode=args.mode,
                quiesce=args.quiesce,
                retries=args.retries,
                workers=args.workers,
                verify=args.verify,
                parent=args.parent,
                progress=progress,
                audit=getattr(args, "audit", 0.0),
                name=args.name,
            ),
        )
    finally:
        hv.close()
        progress.finish()
    if args.json:
        emit_json(result.to_json())
        return 0
    b = result.backup
    freeze = f", freeze {result.freeze_ms:.0f} ms" if result.freeze_ms is not None else ""
    total = result.phase_seconds.get("total", b.seconds)  # the whole command, as in --json
    print(
        f"{b.mode} backup {b.backup_id} of {b.vm}: {result.consistency}-consistent"
        f"{freeze}, {total:.1f} s"
    )
    for d in b.disks:
        print(
            f"  {d.name}: read {human_bytes(d.bytes_read)} of {human_bytes(d.virtual_size)}, "
            f"stored {human_bytes(d.bytes_stored)} ({d.chunks_new} new, "
            f"{d.chunks_reused} reused chunks)"
            + (f" [full: {d.full_reason}]" if d.full_reason else "")
        )
    return 0


def add_vm_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cleanup", help="clear what an interrupted backup left on a VM "
                        "(thaw, merge overlays, drop exports, jobs, stray bitmaps/snapshots)",
        description="After a backup process was killed, bring a VM back to its base "
                    "disks, thawed, with nothing of snapferry's left on it. QEMU: no "
                    "export, block job, lock or stray bitmap (overlay files holding guest "
                    "writes are kept and reported). libvirt: no backup job of ours, no "
                    "checkpoint the killed run created, no scratch file. vSphere: no "
                    "snapferry-* snapshot (one a running backup holds is refused).",
        epilog="examples:\n  snapferry cleanup lab\n"
               "  snapferry cleanup 'qemu+unix:///run/vm1/qmp.sock?agent=/run/vm1/qga.sock'\n"
               "  snapferry cleanup libvirt:///system/web1\n"
               "  snapferry cleanup vsphere://backup@vcenter.example/web1")
    p.add_argument("source", metavar="VM",
                   help="qemu+unix:///QMP?agent=QGA | libvirt:///system/DOMAIN | "
                        "vsphere://USER@HOST/VM | lab")
    p.set_defaults(func=cmd_cleanup)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("lab", help="the lab VM: a small live guest with qemu-guest-agent")
    p.add_argument("action", choices=("up", "down", "status", "write", "read"))
    p.add_argument("path", nargs="?", metavar="GUEST_PATH", help="write/read: file in the guest")
    p.add_argument("--data", help="write: the text to write (default: stdin)")
    p.add_argument("--disks", type=int, default=None, metavar="N", help="up: data disks")
    p.add_argument("--disk-size", default="256M", metavar="SIZE", help="up: size of new disks")
    p.add_argument("--purge", action="store_true", help="down: also delete the lab's disks")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("demo", help="live full + incremental backup of the lab VM, "
                                    "restored and checked")
    p.add_argument("--repo", default=None, help="repository to (re)create for the demo")
    p.add_argument("--keep-lab", action="store_true", help="leave the lab VM running")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def cmd_cleanup(args: argparse.Namespace) -> int:
    from snapferry.engine.hypervisor import Recoverable
    from snapferry.engine.targets import TargetOptions, open_hypervisor

    # the fleecing flavour clears both strategies' leftovers (overlays and fleece nodes)
    topts = TargetOptions(qemu_strategy="fleecing", progress=make_progress(True),
                          reads_disks=False)
    source = args.source
    if source == "lab":
        from snapferry.lab.vm import lab_target

        source, topts.work_dir = lab_target()
    hv = open_hypervisor(source, topts)
    try:
        if not isinstance(hv, Recoverable):
            raise UsageError(f"cleanup is not supported for {args.source!r}")
        done = hv.recover()
    finally:
        hv.close()
    if args.json:
        emit_json({"vm": args.source, "actions": done, "clean": True})
    else:
        for line in done:
            print(f"  {line}")
        print(f"{args.source}: nothing of snapferry's left on it"
              + ("" if done else " (nothing to clean up)"))
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from snapferry.lab import vm as lab

    if args.action == "up":
        vm = lab.lab_up(disks=args.disks, disk_size=args.disk_size)
        if args.json:
            emit_json(lab.lab_info())
        else:
            print(f"lab VM running (pid {vm.pid}, {vm.accel}); back it up with: "
                  f"snapferry backup lab --repo REPO")
            print(f"  {vm.uri}")
        return 0
    if args.action == "down":
        lab.lab_down(purge=args.purge)
        if args.json:
            emit_json({"running": False})
        else:
            print("lab VM stopped")
        return 0
    if args.action == "status":
        st = lab.lab_status()
        if args.json:
            emit_json(st)
        else:
            print_fields(st)
        return 0 if st.get("running") else 3
    if not args.path:
        raise UsageError(f"lab {args.action} needs GUEST_PATH")
    if args.action == "write":
        data = args.data.encode() if args.data is not None else sys.stdin.buffer.read()
        lab.lab_write(args.path, data)
        if args.json:
            emit_json({"path": args.path, "bytes": len(data)})
        return 0
    data = lab.lab_read(args.path)
    if args.json:
        emit_json({"path": args.path, "bytes": len(data), "text": data.decode(errors="replace")})
    else:
        sys.stdout.buffer.write(data)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from snapferry.lab.demo import run_demo

    progress = make_progress(args.json)

    def say(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    try:
        report = run_demo(
            repo_path=Path(args.repo) if args.repo else None,
            keep_lab=args.keep_lab,
            progress=progress,
            say=say,
        )
    finally:
        progress.finish()
    if args.json:
        emit_json(report.to_json())
    else:
        print(report.summary())
    return 0
