"""The ``snapferry`` command line: argument parsing, output and error reporting only.

Commands: init, backup, restore, list, verify, info. Every command takes ``--json``
(one JSON object on stdout). Errors: ``snapferry: <message>`` (one line) on stderr and
the error's exit code; Ctrl-C exits 130; an unexpected exception exits 70 (with
``SNAPFERRY_DEBUG=1`` its traceback is printed too).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from snapferry.cli.output import emit_json, fail, human_bytes, make_progress
from snapferry.engine.errors import SnapferryError, UsageError

REPO_ENV = "SNAPFERRY_REPO"
DEBUG_ENV = "SNAPFERRY_DEBUG"
VM_SCHEMES = ("qemu+unix", "vsphere")
EXIT_BUG = 70
EXIT_INTERRUPTED = 130
FILE_DISK_NAME = "disk"

# snapferry does no linear algebra: keep OpenBLAS (loaded with numpy) from starting
# busy-spinning threads in the CLI and in every worker process it spawns.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``256K``, ``1M``, ``1MiB``, ``4m``, ``65536`` → bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256K, 1M, 1MiB, 65536)")
    num, unit = int(m.group(1)), m.group(2).lower()
    return num << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _add_repo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", metavar="REPO", help=f"repository path (default: ${REPO_ENV})")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="snapferry",
        description="Live, changed-block, deduplicated backups of disks and running VMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("init", help="create a repository")
    p.add_argument("path", metavar="REPO")
    p.add_argument("--chunk-size", type=parse_size, default=None, metavar="SIZE",
                   help="chunk size (power of two, 64K..4M; default 128K)")
    p.add_argument("--compression", type=int, default=None, metavar="LEVEL",
                   help="zstd level 1..19 (default 1; 19 stores least, slowest; "
                        "see docs/chunk-size.md)")
    _add_json(p)

    p = sub.add_parser("backup", help="back up a disk image, an NBD export or a VM")
    p.add_argument("source", metavar="SOURCE",
                   help="disk.raw | nbd://HOST/EXPORT | nbd+unix:///EXPORT?socket=PATH | "
                        "qemu+unix:///QMP?agent=QGA | vsphere://USER@HOST/VM | lab")
    _add_repo(p)
    p.add_argument("--name", help="name the restore points are filed under "
                                  "(default: the file name / export name)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="reader worker processes (default: one per CPU)")
    _add_json(p)
    p.add_argument("--verify", choices=("full", "quick"), default="full",
                   help="pre-commit check: full re-reads new chunks (default), quick "
                        "checks headers only")
    p.add_argument("--bitmap", metavar="NAME", help="NBD: dirty bitmap for an incremental")
    p.add_argument("--parent", metavar="BACKUP_ID",
                   help="chain to this restore point (default: the latest of the same name)")
    p.add_argument("--mode", choices=("auto", "full", "incremental"), default="auto")
    p.add_argument("--quiesce", choices=("required", "preferred", "off"), default="preferred",
                   help="VM sources: guest freeze policy")
    p.add_argument("--retries", type=int, default=1, metavar="N",
                   help="VM sources: quiesce retries")
    p.add_argument("--qemu-strategy", choices=("overlay", "fleecing"), default="overlay",
                   help="QEMU: overlay + block-commit (default) or fleecing "
                        "(copy-before-write, no commit phase)")
    p.add_argument("--vddk-libdir", metavar="DIR", help="vSphere: VDDK library directory")
    p.add_argument("--transport", choices=("vddk", "nbd"), default=None,
                   help="vSphere: read disks through VDDK or nbdkit's vddk plugin")
    p.add_argument("--vddk-transports", metavar="MODES",
                   help="vSphere: VDDK transport modes, e.g. nbdssl:nbd or hotadd:nbdssl")
    p.add_argument("--nbd-uri", metavar="URI",
                   help="vSphere --transport nbd: the nbdkit vddk export per disk; may use "
                        "{disk} {index} {file} {snapshot} {vm}")

    p = sub.add_parser("restore", help="turn a restore point back into a disk image")
    _add_repo(p)
    p.add_argument("backup_id", metavar="BACKUP_ID")
    p.add_argument("--to", required=True, metavar="PATH")
    p.add_argument("--disk", metavar="NAME")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    p.add_argument("--force", action="store_true", help="overwrite an existing target")
    p.add_argument("--workers", type=int, default=0, metavar="N")
    _add_json(p)

    p = sub.add_parser("list", help="list restore points")
    _add_repo(p)
    _add_json(p)

    p = sub.add_parser("verify", help="check restore points and the chunks they use")
    _add_repo(p)
    p.add_argument("backup_id", nargs="?", metavar="BACKUP_ID")
    p.add_argument("--read-data", action="store_true",
                   help="decode and re-hash every referenced chunk")
    _add_json(p)

    p = sub.add_parser("info", help="repository summary: size, dedup and compression")
    _add_repo(p)
    _add_json(p)

    vm = _vm_module()
    if vm is not None and hasattr(vm, "add_vm_commands"):
        vm.add_vm_commands(sub)  # lab, demo (cli/vm.py)
    from snapferry.cli import files, instant, serve  # instant recovery (issue 13)

    for extra in (serve, instant, files):
        COMMANDS[extra.NAME] = extra.add_command(sub)
    return parser


def _vm_module() -> Any:
    """``snapferry.cli.vm`` (VM sources, lab and demo commands) when present in this build."""
    try:
        import snapferry.cli.vm as vm  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as e:
        if e.name != "snapferry.cli.vm":
            raise
        return None
    return vm


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def repo_path(args: argparse.Namespace) -> str:
    path: str | None = getattr(args, "repo", None) or os.environ.get(REPO_ENV)
    if not path:
        raise UsageError(f"no repository given: use --repo REPO or set {REPO_ENV}")
    return path


def open_repo(args: argparse.Namespace) -> Any:
    from snapferry.engine.store.repo import Repository

    return Repository.open(repo_path(args))


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt) while a backup runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def source_kind(source: str) -> str:
    """``vm`` (through the coordinator), ``nbd`` or ``file``."""
    from snapferry.engine.sources import NBD_SCHEMES, scheme_of

    if source == "lab":
        return "vm"
    scheme = scheme_of(source)
    if scheme is None:
        return "file"
    if scheme in VM_SCHEMES:
        return "vm"
    if scheme in NBD_SCHEMES:
        return "nbd"
    return "other"


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from snapferry.engine.store.repo import DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL, Repository

    repo = Repository.init(
        args.path,
        chunk_size=DEFAULT_CHUNK_SIZE if args.chunk_size is None else args.chunk_size,
        zstd_level=DEFAULT_ZSTD_LEVEL if args.compression is None else args.compression,
    )
    if args.json:
        emit_json({"path": str(repo.path), "id": repo.id, "chunk_size": repo.chunk_size,
                   "zstd_level": repo.zstd_level})
    else:
        print(f"initialised repository {repo.path} (chunk size {human_bytes(repo.chunk_size)})")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    kind = source_kind(args.source)
    if kind == "vm":
        vm = _vm_module()
        if vm is None:
            raise UsageError(f"VM sources ({args.source}) are not available in this build")
        return int(vm.backup_vm(args))
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    from snapferry.engine.backup import BackupOptions, run_backup
    from snapferry.engine.sources import open_source

    repo = open_repo(args)
    progress = make_progress(args.json)
    with sigterm_as_interrupt():
        src = open_source(args.source, bitmap=args.bitmap)
        try:
            name = args.name or default_name(args.source, src.describe())
            options = BackupOptions(
                workers=args.workers,
                verify=args.verify,
                parent=args.parent,
                progress=progress,
                no_parent=args.mode == "full",
            )
            disk = plan_plain_disk(repo, name, src, args)
            consistency = "n/a" if kind == "file" else "crash"
            result = run_backup(repo, name, [disk], options, consistency=consistency)
        finally:
            progress.finish()  # clear the bar before any error line
            src.close()
    if args.json:
        emit_json(result.to_json())
    else:
        for d in result.disks:
            print(
                f"{result.mode} backup {result.backup_id} of {result.vm} ({d.name}): "
                f"read {human_bytes(d.bytes_read)}, stored {human_bytes(d.bytes_stored)} "
                f"({d.chunks_new} new, {d.chunks_reused} reused chunks) in {result.seconds:.1f} s"
            )
    return 0


def default_name(source: str, desc: dict[str, Any]) -> str:
    if desc.get("kind") == "file":
        return Path(source).name or "disk"
    export = desc.get("export")
    return str(export) if export else "nbd"


def plan_plain_disk(repo: Any, name: str, src: Any, args: argparse.Namespace) -> Any:
    """The ``DiskInput`` of a file or NBD backup: a dirty-bitmap incremental when
    ``--bitmap`` is given and a parent exists, else a full read of allocated data."""
    from snapferry.engine.backup import DiskInput

    parent = None
    if args.mode != "full":
        parent = repo.load_manifest(args.parent) if args.parent else repo.latest(name)
        if args.mode == "incremental" and parent is None:
            raise UsageError(
                f"--mode incremental needs an earlier restore point of {name!r}: "
                "run a full backup first"
            )
    if args.bitmap is None:
        return DiskInput(name=FILE_DISK_NAME, source=src)
    tracking = {"bitmap": args.bitmap}
    if parent is None or FILE_DISK_NAME not in parent.disk_names:
        reason = None if parent is None and args.mode != "full" else "full backup asked for"
        if parent is None and args.mode != "full":
            reason = "no earlier restore point to chain to"
        return DiskInput(name=FILE_DISK_NAME, source=src, tracking=tracking, full_reason=reason)
    changed = [(e.offset, e.length) for e in src.extents(0, src.size, dirty=True) if e.dirty]
    return DiskInput(name=FILE_DISK_NAME, source=src, changed=changed, tracking=tracking)


def cmd_restore(args: argparse.Namespace) -> int:
    from snapferry.engine.restore import restore

    repo = open_repo(args)
    progress = make_progress(args.json)
    try:
        result = restore(
            repo,
            args.backup_id,
            to=Path(args.to),
            disk=args.disk,
            fmt=args.format,
            force=args.force,
            workers=args.workers,
            progress=progress,
        )
    finally:
        progress.finish()
    if args.json:
        emit_json(result.to_json())
    else:
        print(
            f"restored {result.backup_id} ({result.disk}, {human_bytes(result.virtual_size)}) "
            f"to {result.path} in {result.seconds:.1f} s"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    backups = repo.list_backups()
    if args.json:
        emit_json(
            {
                "repository": str(repo.path),
                "backups": [
                    {
                        "backup_id": m.backup_id,
                        "vm": m.vm,
                        "created": m.created,
                        "mode": m.mode,
                        "parent": m.parent,
                        "consistency": m.consistency,
                        "verified": m.verified,
                        "disks": [
                            {"name": d.name, "virtual_size": d.virtual_size,
                             "bytes_read": d.bytes_read, "bytes_stored": d.bytes_stored}
                            for d in m.disks
                        ],
                    }
                    for m in backups
                ],
            }
        )
        return 0
    if not backups:
        print("no restore points")
        return 0
    print(f"{'BACKUP_ID':24} {'NAME':20} {'MODE':12} {'CONSISTENCY':12} {'SIZE':>10}  CREATED")
    for m in backups:
        print(
            f"{m.backup_id:24} {m.vm[:20]:20} {m.mode:12} {m.consistency:12} "
            f"{human_bytes(m.logical_bytes):>10}  {m.created}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from snapferry.engine.errors import CorruptionError
    from snapferry.engine.verify import verify_repo

    repo = open_repo(args)
    progress = make_progress(args.json)
    report = verify_repo(repo, args.backup_id, read_data=args.read_data, progress=progress)
    progress.finish()
    if args.json:
        emit_json(report.to_json())
        return 0 if report.ok else CorruptionError.exit_code
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"problem: {problem}")
    what = "data and structure" if args.read_data else "structure"
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


def cmd_info(args: argparse.Namespace) -> int:
    from snapferry.engine.verify import repo_info

    repo = open_repo(args)
    info = repo_info(repo)
    if args.json:
        emit_json(info)
        return 0
    print(f"repository     {info['path']}")
    print(f"chunk size     {human_bytes(info['chunk_size'])}, zstd level {info['zstd_level']}")
    print(f"restore points {len(info['restore_points'])}")
    print(f"chunks         {info['chunks']} ({human_bytes(info['chunk_bytes_stored'])} stored, "
          f"{human_bytes(info['chunk_bytes_raw'])} raw)")
    print(f"size on disk   {human_bytes(info['size_on_disk'])}")
    print(f"logical data   {human_bytes(info['data_bytes'])} in "
          f"{human_bytes(info['logical_bytes'])} of disks")
    for key in ("dedup_ratio", "compression_ratio", "total_ratio"):
        if info.get(key) is not None:
            print(f"{key.replace('_', ' '):14} {info[key]}")
    left = info.get("leftovers") or {}
    if any(left.values()):
        print(f"unreferenced   {left['packs']} packs ({human_bytes(left['pack_bytes'])}), "
              f"{left['index_files']} index files ({human_bytes(left['index_bytes'])}), "
              f"{left['temp_files']} temp files ({human_bytes(left['temp_bytes'])}): "
              "left by interrupted backups")
    for bad in info.get("damaged_restore_points") or []:
        print(f"damaged        restore point {bad['backup_id']}: {bad['problem']}")
    return 0


COMMANDS = {
    "init": cmd_init,
    "backup": cmd_backup,
    "restore": cmd_restore,
    "list": cmd_list,
    "verify": cmd_verify,
    "info": cmd_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never raises, never prints a traceback
    unless ``SNAPFERRY_DEBUG=1``)."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        cmd = COMMANDS.get(args.command)
        if cmd is None:  # a command added by cli/vm.py: lab -> snapferry.cli.vm.cmd_lab
            cmd = getattr(_vm_module(), f"cmd_{args.command}")
        return int(cmd(args))
    except SnapferryError as e:
        if debug:
            traceback.print_exc()
        return fail(str(e) or type(e).__name__, e.exit_code)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        return fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): nothing more to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 1
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:
        if debug:
            traceback.print_exc()
            tb = getattr(e, "worker_traceback", None)
            if tb:
                sys.stderr.write(tb)
        return fail(
            f"internal error: {type(e).__name__}: {e} (run with {DEBUG_ENV}=1 for a traceback)",
            EXIT_BUG,
        )


if __name__ == "__main__":
    raise SystemExit(main())
