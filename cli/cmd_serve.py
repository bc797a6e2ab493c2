"""``snapferry serve``: a read-only NBD export of one restore-point disk (nbdkit).

Runs in the foreground until SIGINT or SIGTERM, then stops nbdkit and exits 0. With
``--json`` it prints one JSON object (on one line) once the export answers.

On ``--socket`` nbdkit runs detached (its own background process, pid file
``SOCKET.pid``, holding the repository's shared lock itself): if this process is
killed (SIGKILL, a crash), the export keeps serving, so a VM reading from it notices
nothing; ``serve`` again on the same socket replaces it (and says so). On ``--port``
nbdkit exits with this process.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from snapferry.cli.common import epilog
from snapferry.cli.output import human_bytes
from snapferry.engine.errors import UsageError

NAME = "serve"
EXAMPLES = """
  snapferry serve latest --socket /run/rp.sock            # then: nbdinfo 'nbd+unix:///?socket=/run/rp.sock'
  snapferry serve 20261125T193924Z-3f9a0c1e --disk vda --port 10809
"""


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("serve", help="serve a restore point read-only over NBD (nbdkit)",
                       epilog=epilog(EXAMPLES))
    p.add_argument("backup_id", metavar="BACKUP_ID")
    p.add_argument("--repo", metavar="REPO", help="repository path (default: $SNAPFERRY_REPO)")
    p.add_argument("--disk", metavar="NAME", help="disk of the restore point (default: the "
                                                   "only one)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="listen on this unix socket")
    where.add_argument("--port", type=int, metavar="N", help="listen on TCP port N (loopback "
                                                             "unless --host)")
    p.add_argument("--host", default="127.0.0.1",
                   help="--port: address to listen on (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object once serving")
    return cmd_serve


def repo_path_of(args: argparse.Namespace) -> str:
    """The repository (``--repo`` or ``$SNAPFERRY_REPO``): a directory, or an
    ``s3://BUCKET/PREFIX`` URL (nbdkit's plugin opens it from that string, with the
    endpoint and credentials of the environment it inherits). Also sets the
    ``--password-file`` for this process's own opening of the repository."""
    from snapferry.cli.common import repo_path
    from snapferry.engine.store import keys

    keys.set_password_file(getattr(args, "password_file", None))
    return str(repo_path(args))


def emit_line(obj: object) -> None:
    """One JSON object on one line (a reader of a long-running command reads a line)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the returned event instead of raising."""
    ev = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        ev.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield ev
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cmd_serve(args: argparse.Namespace) -> int:
    from snapferry.engine.serve.server import ExportOptions, NbdkitExport, ServeError

    opts = ExportOptions(
        repo=repo_path_of(args),
        backup_id=args.backup_id,
        disk=args.disk,
        socket=Path(args.socket) if args.socket else None,
        port=args.port,
        host=args.host,
        password_file=getattr(args, "password_file", None),
        # on a socket nbdkit is detached: a killed serve leaves it serving (a VM reading
        # from it notices nothing); serve again on that socket takes it over
        exit_with_parent=args.socket is None,
    )
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1..65535, not {args.port}")
    export = NbdkitExport(opts)
    with stop_signals() as stop:
        export.start()
        if export.took_over is not None:
            sys.stderr.write(f"snapferry: took over {args.socket} from nbdkit pid "
                             f"{export.took_over}, left serving by a killed snapferry\n")
        try:
            info = export.info()
            if args.json:
                emit_line(info.to_json())
            else:
                print(f"serving {info.backup_id} ({info.vm}, disk {info.disk}, "
                      f"{human_bytes(info.size)}) read-only at {info.uri}; "
                      f"Ctrl-C or SIGTERM stops", flush=True)
            while not stop.is_set():
                time.sleep(0.2)
                if not export.alive():
                    raise ServeError(f"nbdkit exited unexpectedly: {export._why()}")
        finally:
            export.stop()
    if not args.json:
        print("stopped", flush=True)
    return 0
