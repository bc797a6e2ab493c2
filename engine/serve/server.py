"""Start, watch and stop the nbdkit process that exports one restore-point disk.

    snapferry (this process)                      nbdkit (own session, --exit-with-parent)
      validate: repo, backup id, disk, socket       python plugin (nbdkit_plugin.py) in
      spawn nbdkit --readonly ... python ...  --->  nbdkit's /usr/bin/python3, with
      forward its stderr lines (one per event)      sitedirs= pointing at our
      wait until the socket/port answers            site-packages
      SIGINT/SIGTERM -> SIGTERM nbdkit, reap it

Bad input never reaches nbdkit: an unknown backup id or disk, a socket path in use (a
live server answers on it, or a non-socket file is there), a port in use are refused
here as one ``UsageError`` line. A stale socket file (nothing listening) is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from snapferry.engine.errors import SnapferryError, UsageError
from snapferry.engine.procs import process_alive, process_start

READY_TIMEOUT = 60.0
READY_PREFIX = "snapferry serve: "
READY_LINE = "ready (lock held)"  # nbdkit_plugin.READY_LINE
STOP_TIMEOUT = 10.0
MAX_UNIX_PATH = 107


class ServeError(SnapferryError):
    """The NBD server could not be started or died."""


@dataclass(frozen=True)
class ExportOptions:
    repo: Path | str  # a directory or an s3://BUCKET/PREFIX URL
    backup_id: str
    disk: str | None = None
    socket: Path | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    threads: int = 8
    cache_bytes: int | None = None
    readahead_bytes: int | None = None
    # False: nbdkit outlives this process (instant: a killed ``snapferry instant`` must
    # not take its VM's disks away); nbdkit then holds the repository lock itself
    exit_with_parent: bool = True
    password_file: str | None = None  # encrypted repositories, for nbdkit's plugin
    model: str | None = None  # nbdkit thread model (nbdkit_plugin.thread_model)


@dataclass
class ExportInfo:
    backup_id: str
    vm: str
    disk: str
    size: int
    uri: str
    socket: str | None
    port: int | None
    pid: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id, "vm": self.vm, "disk": self.disk,
            "size": self.size, "uri": self.uri, "socket": self.socket, "port": self.port,
            "pid": self.pid, "read_only": True, **self.extra,
        }


def plugin_path() -> Path:
    return Path(__file__).with_name("nbdkit_plugin.py")


def site_dirs() -> list[str]:
    """Directories nbdkit's embedded Python needs to import snapferry and its
    dependencies: this interpreter's site-packages (with their .pth files)."""
    out: list[str] = []
    paths = sysconfig.get_paths()
    for p in (paths.get("purelib"), paths.get("platlib"), *sys.path):
        if p and p.rstrip("/").endswith(("site-packages", "dist-packages")) and p not in out \
                and Path(p).is_dir():
            out.append(p)
    return out


_nbdkit_python: str | None = None


def nbdkit_python_version(nbdkit: str) -> str:
    """The Python version nbdkit's python plugin embeds (``--dump-plugin``)."""
    global _nbdkit_python
    if _nbdkit_python is None:
        r = subprocess.run([nbdkit, "python", "--dump-plugin"], capture_output=True, text=True)
        if r.returncode != 0:
            raise UsageError(
                "nbdkit's python plugin is not installed (apt-get install nbdkit-plugin-python)"
            )
        ver = ""
        for line in r.stdout.splitlines():
            if line.startswith("python_version="):
                ver = line.split("=", 1)[1].strip()
        _nbdkit_python = ver
    return _nbdkit_python


def check_tools() -> str:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise UsageError("nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)")
    ver = nbdkit_python_version(nbdkit)
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if ver and ".".join(ver.split(".")[:2]) != mine:
        raise UsageError(
            f"nbdkit's python plugin embeds Python {ver} but snapferry runs under Python "
            f"{mine}: its compiled dependencies cannot load there; install snapferry for "
            f"Python {ver.rsplit('.', 1)[0]}"
        )
    return nbdkit


def _connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def check_socket_path(path: Path) -> None:
    """Refuse a socket path that is in use; remove a stale socket file."""
    if len(str(path)) > MAX_UNIX_PATH:
        raise UsageError(f"socket path {path} is too long ({MAX_UNIX_PATH} bytes at most)")
    if not path.parent.is_dir():
        raise UsageError(f"directory {path.parent} does not exist")
    if path.is_symlink() or path.exists():
        import stat

        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"socket path {path} exists and is not a socket")
        if _connectable(path):
            raise UsageError(f"socket path {path} is in use (a server answers on it)")
        path.unlink()


def check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UsageError(f"port must be 1..65535, not {port}")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    finally:
        s.close()


def drop_stale_locks(repo: str, pids: list[int]) -> None:
    """Remove the lock objects of the nbdkit processes ``pids`` once they are dead (a
    killed nbdkit cannot remove its own)."""
    from snapferry.engine.store import locks
    from snapferry.engine.store.repo import Repository

    backend = Repository.open(repo).backend
    for info in list(backend.objects("locks")):
        held = locks.read_lock(backend, info.name)
        if held and held.get("pid") in pids and locks.is_stale(held, info.size):
            with contextlib.suppress(SnapferryError):
                backend.remove("locks", info.name)


class NbdkitExport:
    """One restore-point disk served read-only by nbdkit (the Python plugin)."""

    def __init__(self, opts: ExportOptions, *, log: IO[str] | None = None) -> None:
        if (opts.socket is None) == (opts.port is None):
            raise UsageError("give exactly one of --socket PATH or --port N")
        self.opts = opts
        self._log = log if log is not None else sys.stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: deque[str] = deque(maxlen=20)
        self._ready = False
        self._fwd: threading.Thread | None = None
        self._fwd2: threading.Thread | None = None
        self._locked = threading.Event()  # nbdkit said it holds the repository lock
        self._daemon: int | None = None
        self.took_over: int | None = None  # pid of an orphaned nbdkit this export replaced
        from snapferry.engine.restore import pick_disk
        from snapferry.engine.store.repo import Repository

        repo = Repository.open(opts.repo)
        manifest = repo.load_manifest(opts.backup_id)
        self.disk = pick_disk(manifest, opts.disk)
        index = repo.load_index(opts.backup_id, self.disk, manifest)
        self.size = index.virtual_size
        self.vm = manifest.vm
        loc = str(opts.repo)
        self.repo_path = loc if loc.startswith("s3://") else str(Path(loc).resolve())
        self.nbdkit = check_tools()

    # -- addresses ------------------------------------------------------------------
    @property
    def uri(self) -> str:
        if self.opts.socket is not None:
            return f"nbd+unix:///?socket={self.opts.socket.resolve()}"
        host = self.opts.host if ":" not in self.opts.host else f"[{self.opts.host}]"
        return f"nbd://{host}:{self.opts.port}/"

    def info(self) -> ExportInfo:
        assert self.pid is not None
        return ExportInfo(
            backup_id=self.opts.backup_id, vm=self.vm, disk=self.disk, size=self.size,
            uri=self.uri, socket=str(self.opts.socket.resolve()) if self.opts.socket else None,
            port=self.opts.port, pid=self.pid,
        )

    @property
    def pidfile(self) -> Path | None:
        """Detached mode (``exit_with_parent`` false): where nbdkit writes its pid."""
        if self.opts.exit_with_parent or self.opts.socket is None:
            return None
        return self.opts.socket.absolute().with_name(self.opts.socket.name + ".pid")

    @property
    def pid(self) -> int | None:
        """The serving nbdkit process (in detached mode the daemon, not the launcher)."""
        if self.pidfile is None:
            return self.proc.pid if self.proc is not None else None
        return self._daemon

    def command(self) -> list[str]:
        o = self.opts
        cmd = [self.nbdkit, "--readonly", "--threads", str(o.threads)]
        if self.pidfile is not None:
            # detached: nbdkit 1.32 sets PR_SET_PDEATHSIG even without
            # --exit-with-parent when it runs in the foreground, so a process that must
            # outlive us has to be nbdkit's own background child (it forks after
            # listening; the pdeath signal is not inherited across that fork)
            cmd += ["--log=stderr", "--pidfile", str(self.pidfile)]
        else:
            cmd += ["--foreground", "--exit-with-parent"]
        if o.socket is not None:
            cmd += ["--unix", str(o.socket.resolve())]
        else:
            cmd += ["--ipaddr", o.host, "--port", str(o.port)]
        cmd += ["python", f"script={plugin_path()}", f"sitedirs={':'.join(site_dirs())}",
                f"repo={self.repo_path}", f"backup={o.backup_id}", f"disk={self.disk}"]
        if o.cache_bytes is not None:
            cmd.append(f"cache={o.cache_bytes}")
        if o.readahead_bytes is not None:
            cmd.append(f"readahead={o.readahead_bytes}")
        if o.model is not None:
            cmd.append(f"model={o.model}")
        if o.password_file is not None:
            cmd.append(f"password_file={Path(o.password_file).absolute()}")
        # the server's own shared lock: it stays held while nbdkit serves, whatever
        # happens to this process
        cmd.append(f"lock=serve {o.backup_id} (nbdkit)")
        return cmd

    # -- life cycle -----------------------------------------------------------------
    def start(self, timeout: float = READY_TIMEOUT) -> NbdkitExport:
        o = self.opts
        self._daemon = None
        self._locked.clear()
        self.took_over = None
        if o.socket is not None:
            if self.pidfile is not None:
                self.took_over = self._replace_orphan()
            check_socket_path(o.socket.absolute())
            if self.pidfile is not None and self.ownerfile is not None:
                self.pidfile.unlink(missing_ok=True)
                self.ownerfile.write_text(json.dumps(
                    {"pid": os.getpid(), "start": process_start(os.getpid())}) + "\n")
        else:
            assert o.port is not None
            check_port(o.host, o.port)
        env = dict(os.environ)
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        # the shared lock role is held by nbdkit itself (plugin parameter lock=), from
        # before it listens until it exits: prune cannot delete what is served, and a
        # SIGKILL of this process leaves no stale lock (nbdkit exits cleanly with it, or
        # outlives it still holding the lock)
        cmd = self.command()
        fds: tuple[int, ...] = ()
        log_r = -1
        if self.pidfile is not None:
            # detached nbdkit loses its stderr when it forks into the background: the
            # plugin's lines come on a pipe of their own (logfd=N) instead
            log_r, log_w = os.pipe()
            fds = (log_w,)
            cmd.append(f"logfd={log_w}")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env, start_new_session=True, pass_fds=fds,
        )
        assert self.proc.stderr is not None
        self._fwd = threading.Thread(target=self._forward, args=(self.proc.stderr,),
                                     daemon=True, name="nbdkit-log")
        self._fwd.start()
        if fds:
            os.close(fds[0])
            self._fwd2 = threading.Thread(target=self._forward, args=(os.fdopen(log_r, "rb"),),
                                          daemon=True, name="nbdkit-log2")
            self._fwd2.start()
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None and (self.pidfile is None or code != 0):
                self._fwd.join(2)
                raise ServeError(f"nbdkit exited at start: {self._why()}")
            if self.pidfile is not None and self._daemon is None and code == 0:
                self._daemon = self._read_pidfile()  # written by the background child
            if self._answers() and (self.pidfile is None or self._daemon is not None) \
                    and self._locked.is_set():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"nbdkit did not start listening within {timeout:.0f} s")
            time.sleep(0.05)
        self._ready = True
        return self

    def _replace_orphan(self) -> int | None:
        """An nbdkit left serving this socket by a killed snapferry (its pid file names
        a live nbdkit running our plugin on this socket): SIGKILL it and drop its lock,
        then this export takes the socket. SIGKILL, not SIGTERM: a stopping nbdkit
        answers requests in flight with an error that QEMU passes to the guest, while a
        dropped connection is retried by QEMU once it reconnects. Returns its pid."""
        pid = self._read_pidfile()
        if pid is None or not process_alive(pid):
            return None
        owner = self._read_owner()
        if owner is not None and process_alive(*owner):
            return None  # its snapferry runs: the socket is in use (refused below)
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return None
        assert self.opts.socket is not None
        if not argv.split("\0")[0].endswith("nbdkit") or str(plugin_path()) not in argv \
                or str(self.opts.socket.resolve()) not in argv:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < end:
            time.sleep(0.02)
        # /proc/PID/stat says Z once the main thread is gone, while the plugin's other
        # threads may still be exiting with the listening socket open: wait for it too
        while _connectable(self.opts.socket) and time.monotonic() < end:
            time.sleep(0.02)
        drop_stale_locks(self.repo_path, [pid])
        return pid

    @property
    def ownerfile(self) -> Path | None:
        """Detached mode: the snapferry process that runs this export (pid, start)."""
        return None if self.pidfile is None else self.pidfile.with_suffix(".owner")

    def _read_owner(self) -> tuple[int, str | None] | None:
        assert self.ownerfile is not None
        try:
            doc = json.loads(self.ownerfile.read_text())
            return int(doc["pid"]), doc.get("start")
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _read_pidfile(self) -> int | None:
        assert self.pidfile is not None
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _answers(self) -> bool:
        if self.opts.socket is not None:
            return self.opts.socket.exists() and _connectable(self.opts.socket)
        try:
            with socket.create_connection((self.opts.host, int(self.opts.port or 0)), 1.0):
                return True
        except OSError:
            return False

    def _why(self) -> str:
        lines = [ln for ln in self._lines if ln.strip()]
        for ln in reversed(lines):
            if ln.startswith("snapferry serve: "):
                return ln.removeprefix("snapferry serve: ")
        for ln in reversed(lines):
            if "error" in ln.lower():
                return ln.strip()
        return lines[-1].strip() if lines else "no message"

    def _forward(self, stream: IO[bytes]) -> None:
        """Copy nbdkit's stderr: our own one-line messages as they are; nbdkit's
        Python tracebacks (printed after our line for the same failure) are dropped."""
        with contextlib.suppress(OSError, ValueError):
            self._copy_lines(stream)
        with contextlib.suppress(OSError):
            stream.close()

    def _copy_lines(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if line == READY_PREFIX + READY_LINE:
                self._locked.set()
                continue
            self._lines.append(line)
            if self._ready and line.startswith("snapferry serve: "):
                with contextlib.suppress(OSError, ValueError):
                    self._log.write(line + "\n")
                    self._log.flush()

    def alive(self) -> bool:
        if self.pidfile is None:
            return self.proc is not None and self.proc.poll() is None
        return self._daemon is not None and process_alive(self._daemon)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the foreground nbdkit to exit: its exit code, or None on timeout."""
        assert self.proc is not None and self.pidfile is None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def restart(self) -> None:
        """Start nbdkit again on the same address (after it died)."""
        self.stop()
        self.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM nbdkit (it closes connections, gives up its lock and exits), SIGKILL
        after ``timeout``."""
        p = self.proc
        if self.pidfile is not None:
            d = self._daemon
            if d is not None and process_alive(d):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(d, signal.SIGTERM)
                end = time.monotonic() + timeout
                while process_alive(d) and time.monotonic() < end:
                    time.sleep(0.05)
                if process_alive(d):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(d, signal.SIGKILL)
            self._daemon = None
            self.pidfile.unlink(missing_ok=True)
            if self.ownerfile is not None:
                self.ownerfile.unlink(missing_ok=True)
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)
        for t in (self._fwd, self._fwd2):
            if t is not None:
                t.join(2)
        if self.opts.socket is not None:
            with contextlib.suppress(OSError):
                if not _connectable(self.opts.socket):
                    self.opts.socket.unlink()

    def __enter__(self) -> NbdkitExport:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
