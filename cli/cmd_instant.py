"""``snapferry instant``: boot the lab VM straight from a restore point; restore it live.

    snapferry instant BACKUP_ID [--lab-dir DIR] [--live-restore DIR] [--json]

Without ``--live-restore`` the command serves the VM's disks until SIGINT/SIGTERM, then
shuts the VM down (its writes stay in the overlays in the lab dir) and stops serving.
With it, the disks are copied to DIR while the VM runs, the VM is switched onto them,
serving stops and the command exits 0, leaving the VM running on local disks.

If an earlier ``instant`` on the same lab dir was killed (SIGKILL, a crash), its VM and
exports keep running; the same command again takes them over (see lab/instant.py) and
says what it found: a copy still running is adopted (``--live-restore``) or cancelled,
disks already switched onto their copies are finished.
``--json`` prints one JSON object per line per phase: ``booted``, then ``restored`` or
``stopped``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

from snapferry.cli.cmd_serve import emit_line, repo_path_of, stop_signals
from snapferry.cli.common import epilog, parse_size
from snapferry.engine.errors import SnapferryError

NAME = "instant"
EXAMPLES = """
  snapferry instant latest:lab                              # boot the lab VM from it
  snapferry instant latest:lab --live-restore /var/lib/vm1  # ... and copy it back live
  # after a crash of the above: the same command again takes its VM over and finishes
  snapferry instant latest:vm1 --qmp /run/vm9.qmp --lab-dir /var/tmp/vm9  # any QEMU
"""


def default_instant_dir() -> Path:
    env = os.environ.get("SNAPFERRY_LAB_DIR")
    if env:
        return Path(env + "-instant")
    return Path.home() / ".cache" / "snapferry" / "instant"


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("instant", help="boot the lab VM from a restore point (disks served "
                                       "from the repository), optionally restore it live",
                       epilog=epilog(EXAMPLES))
    p.add_argument("backup_id", metavar="BACKUP_ID")
    p.add_argument("--repo", metavar="REPO", help="repository path (default: $SNAPFERRY_REPO)")
    p.add_argument("--lab-dir", metavar="DIR", help="where the VM's overlays, sockets and "
                                                    "logs go (default: a lab dir of its own)")
    p.add_argument("--live-restore", metavar="DIR", help="copy the disks into DIR while the "
                                                         "VM runs, then switch the VM onto them")
    p.add_argument("--restore-delay", type=float, default=0.0, metavar="S",
                   help="--live-restore: seconds to wait after the boot before copying "
                        "(default: %(default)s)")
    p.add_argument("--restore-speed", type=parse_size, default=0, metavar="BYTES",
                   help="--live-restore: copy at most this many bytes/s per disk, e.g. 50M "
                        "(default: %(default)s, no limit)")
    p.add_argument("--qmp", metavar="SOCKET",
                   help="instead of booting the lab VM, add the disks to the running QEMU "
                        "on this QMP socket as block nodes sf-inst-<disk> (qcow2 overlays "
                        "in --lab-dir over the exports) and report them; attach them to "
                        "devices yourself; no --live-restore (default: none)")
    p.add_argument("--no-workload", action="store_true",
                   help="do not start the lab guest's write workload")
    p.add_argument("--json", action="store_true", help="one JSON object per phase, per line")
    return cmd_instant


def cmd_qmp_attach(args: argparse.Namespace) -> int:
    """``--qmp``: block nodes in someone else's QEMU, served until SIGINT/SIGTERM."""
    import sys

    from snapferry.engine.errors import UsageError
    from snapferry.engine.serve.attach import QmpAttach

    if args.live_restore:
        raise UsageError("--live-restore works with the lab VM only, not with --qmp")
    work = Path(args.lab_dir) if args.lab_dir else default_instant_dir() / "qmp"
    att = QmpAttach(repo_path_of(args), args.backup_id, Path(args.qmp), work,
                    password_file=getattr(args, "password_file", None))
    with stop_signals() as stop:
        nodes = att.attach()
        if args.json:
            emit_line({"event": "attached", "backup_id": args.backup_id, "qmp": args.qmp,
                       "nodes": nodes})
        else:
            for n in nodes:
                print(f"disk {n['disk']}: block node {n['node']} (overlay {n['overlay']}) in "
                      f"QEMU at {args.qmp}; attach it, e.g. device_add "
                      f"virtio-blk-pci,drive={n['node']}", flush=True)
        while not stop.is_set():
            time.sleep(0.2)
            for d in att.disks:
                if not d.export.alive():
                    d.export.restart()
    kept = att.detach()
    for line in kept:
        sys.stderr.write(f"snapferry: {line}\n")
    if args.json:
        emit_line({"event": "stopped", "kept": kept})
    else:
        print("stopped" + ("" if not kept else "; some nodes stay in use (see above)"),
              flush=True)
    return 0


def cmd_instant(args: argparse.Namespace) -> int:
    from snapferry.lab.instant import InstantVm

    if args.qmp:
        return cmd_qmp_attach(args)

    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)
        else:
            import sys

            sys.stderr.write(f"snapferry: {msg}\n")

    lab_dir = Path(args.lab_dir) if args.lab_dir else default_instant_dir()
    target = Path(args.live_restore) if args.live_restore else None
    if target is not None and not target.is_dir():
        from snapferry.engine.errors import UsageError

        raise UsageError(f"live-restore directory {target} does not exist")
    inst = InstantVm(repo_path_of(args), args.backup_id, lab_dir, say=say,
                     password_file=getattr(args, "password_file", None))
    failed = False
    with stop_signals() as stop:
        inst.boot(workload=not args.no_workload)
        to_agent = time.monotonic() - t0
        info = inst.info()
        info["seconds_to_agent"] = round(to_agent, 3)
        info["reattached"] = inst.reattach
        info["notes"] = inst.notes
        if args.json:
            emit_line({"event": "booted", **info})
        elif inst.reattach:
            print(f"took over VM {inst.vm_name} (pid {info['pid']}, booted from "
                  f"{args.backup_id}); QMP {info['qmp']}, agent {info['agent']}", flush=True)
        else:
            print(f"VM {inst.vm_name} booted from {args.backup_id} in {to_agent:.1f} s "
                  f"(guest agent answers); QMP {info['qmp']}, agent {info['agent']}",
                  flush=True)
        if target is None and inst.all_local():
            inst.finish_local()
            if args.json:
                emit_line({"event": "restored", **inst.info()})
            else:
                print("the VM already runs on its local disks; serving stopped", flush=True)
            return 0
        if target is None:
            inst.cancel_adopted()
        try:
            if target is not None:
                end = time.monotonic() + args.restore_delay
                while time.monotonic() < end and not stop.is_set():
                    inst.supervise()
                    time.sleep(0.1)
                if stop.is_set():
                    raise KeyboardInterrupt
                try:
                    res = inst.live_restore(target, should_stop=stop.is_set,
                                            speed=args.restore_speed)
                except KeyboardInterrupt:
                    raise
                except SnapferryError as e:
                    import sys

                    sys.stderr.write(
                        f"snapferry: live restore failed: {e}; the VM keeps running on its "
                        "overlays, served from the repository; SIGINT/SIGTERM shuts it down\n")
                    failed = True
                    target = None
                else:
                    out = {"event": "restored", **res.to_json(), **inst.info()}
                    if args.json:
                        emit_line(out)
                    else:
                        print(f"live restore done in {res.seconds:.1f} s: the VM runs on "
                              f"{', '.join(res.targets)}; serving stopped", flush=True)
                    return 0
            while not stop.is_set():
                inst.supervise()
                time.sleep(0.2)
        except KeyboardInterrupt:
            inst.shutdown_vm()
            inst.stop_exports()
            overlays = ", ".join(str(d.overlay) for d in inst.disks)
            raise SnapferryError(
                "interrupted: " + ("the live restore was cancelled and its targets removed; "
                                   if target is not None else "")
                + f"the VM was shut down, its writes kept in {overlays}; run snapferry "
                f"instant {args.backup_id} --lab-dir {inst.lab_dir} to boot it again"
            ) from None
        except BaseException:
            inst.stop_exports()
            raise
    # normal stop without live restore: SIGINT/SIGTERM
    inst.shutdown_vm()
    inst.stop_exports()
    if args.json:
        emit_line({"event": "stopped", "overlays": [str(d.overlay) for d in inst.disks]})
    else:
        print(f"VM stopped; its writes are kept in "
              f"{', '.join(str(d.overlay) for d in inst.disks)}", flush=True)
    return 1 if failed else 0
