"""Real NBD servers for tests: qemu-nbd and nbdkit on unix sockets, started and stopped.

Reusable by any test module (pytest puts ``tests/`` on ``sys.path``)::

    from nbdservers import NbdServers, make_image, requires

    @requires("qemu-nbd", "qemu-img")
    def test_x(tmp_path):
        img = make_image(tmp_path / "d.qcow2", 8 << 20, [(0, 0x55, 1 << 20)], fmt="qcow2")
        with NbdServers(tmp_path) as servers:
            srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
            ... NbdSource.open(srv.uri, bitmap="b0") ...

or the ``nbd_servers`` fixture below (import it into the test module). Every server is
killed when the ``NbdServers`` block ends, whatever happened; each server also gets
``PR_SET_PDEATHSIG`` so a crashed test run leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

SOCKET_PATH_MAX = 100  # sun_path is 108 bytes


def requires(*tools: str) -> pytest.MarkDecorator:
    """Skip (with the reason) when a command-line tool is not installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (not installed)")


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class NbdServer:
    """One running server process exporting one disk on a unix socket."""

    name: str
    argv: list[str]
    socket: Path
    export: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{quote(self.export)}?socket={quote(str(self.socket))}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the process to end by itself; its return code."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the server dies without a goodbye (a crash, a dropped connection)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; idempotent."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def start(self, timeout: float = 20.0, *, probe: bool = True) -> NbdServer:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}: {self.log_text()}"
                )
            if self.socket.exists() and (
                _can_connect(self.socket) if probe else _is_listening(self.socket)
            ):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} did not listen on {self.socket}: {self.log_text()}"
                )
            time.sleep(0.02)


def _is_listening(path: Path) -> bool:
    """A unix socket in the listening state (/proc/net/unix), found without connecting:
    a connection would be a client, and a server without ``-t`` exits when it leaves."""
    want = str(path)
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return _can_connect(path)
    for line in lines:
        f = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; St 01 = unconnected, flags
        # 00010000 = __SO_ACCEPTCON (listening)
        if len(f) >= 8 and f[7] == want and int(f[3], 16) & 0x10000:
            return True
    return False


def _can_connect(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


@dataclass
class NbdServers:
    """Starts servers whose sockets live under ``base`` (or a short /tmp directory when
    ``base`` is too long for a unix socket path) and stops them all on exit."""

    base: Path
    servers: list[NbdServer] = field(default_factory=list)
    _sockdir: Path | None = None
    _own_sockdir: bool = False

    def __enter__(self) -> NbdServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        for s in self.servers:
            try:
                s.stop()
            except Exception:
                s.kill()
        self.servers.clear()
        if self._own_sockdir and self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def _sock(self, name: str) -> Path:
        if self._sockdir is None:
            cand = self.base / "sockets"
            if len(str(cand)) + 24 > SOCKET_PATH_MAX:
                self._sockdir = Path(tempfile.mkdtemp(prefix="sfnbd-", dir="/tmp"))
                self._own_sockdir = True
            else:
                cand.mkdir(parents=True, exist_ok=True)
                self._sockdir = cand
        return self._sockdir / f"{name}-{len(self.servers)}.sock"

    def _start(
        self, name: str, argv: list[str], sock: Path, export: str, *, probe: bool = True
    ) -> NbdServer:
        log = self.base / f"{sock.stem}.log"
        srv = NbdServer(name, argv, sock, export, log)
        self.servers.append(srv)
        return srv.start(probe=probe)

    def qemu_nbd(
        self,
        image: Path,
        *,
        fmt: str = "raw",
        bitmap: str | None = None,
        shared: int = 8,
        export: str = "",
        read_only: bool = True,
        extra: Sequence[str] = (),
        socket: Path | None = None,
        persistent: bool = True,
    ) -> NbdServer:
        """``qemu-nbd -t`` exporting ``image``; ``shared`` > 1 makes it advertise
        multi-conn (qemu-nbd's default of 1 client does not). ``socket``: listen there
        (e.g. the socket of a stopped server: the same NBD URI, so the same source).
        ``persistent=False`` leaves out ``-t``: the server exits when its last client
        leaves (its readiness is then checked without connecting)."""
        sock = socket or self._sock("qemu-nbd")
        argv = ["qemu-nbd", "-f", fmt, "-k", str(sock), "-e", str(shared), "-x", export]
        if persistent:
            argv.insert(1, "-t")
        if read_only:
            argv.append("-r")
        if bitmap is not None:
            argv += ["-B", bitmap]
        argv += [*extra, str(image)]
        return self._start("qemu-nbd", argv, sock, export, probe=persistent)

    def nbdkit(
        self,
        plugin: str,
        *plugin_args: str,
        filters: Sequence[str] = (),
        export: str = "",
        read_only: bool = True,
        extra: Sequence[str] = (),
    ) -> NbdServer:
        """``nbdkit -f`` with ``plugin`` (and ``--filter=F`` for each of ``filters``);
        ``plugin_args`` carry both plugin and filter parameters (``key=value``)."""
        sock = self._sock("nbdkit")
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "-e", export]
        if read_only:
            argv.append("-r")
        argv += [f"--filter={f}" for f in filters]
        argv += [*extra, plugin, *plugin_args]
        return self._start("nbdkit", argv, sock, export)


@pytest.fixture
def nbd_servers(tmp_path: Path) -> Iterator[NbdServers]:
    """Servers started through this fixture are stopped at teardown."""
    servers = NbdServers(tmp_path)
    try:
        yield servers
    finally:
        servers.stop_all()


# -- images ------------------------------------------------------------------------------

Write = tuple[int, int | None, int]  # (offset, byte pattern or None for a zero write, length)


def qemu_io(image: Path, fmt: str, commands: Sequence[str]) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def write_commands(writes: Sequence[Write]) -> list[str]:
    return [
        f"write -z {off} {ln}" if pat is None else f"write -P {pat:#x} {off} {ln}"
        for off, pat, ln in writes
    ]


def make_image(
    path: Path, size: int, writes: Sequence[Write] = (), *, fmt: str = "raw"
) -> Path:
    """A sparse image of ``size`` bytes with ``writes`` applied through qemu-io
    (pattern writes allocate data; ``None`` writes zeros, which qcow2 keeps as zero
    clusters)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    if writes:
        qemu_io(path, fmt, write_commands(writes))
    return path


def expected_bytes(size: int, writes: Sequence[Write]) -> bytearray:
    """What ``make_image`` + ``writes`` should read back as."""
    data = bytearray(size)
    for off, pat, ln in writes:
        data[off : off + ln] = bytes([pat or 0]) * ln
    return data


def nbdcopy_to_file(uri: str, dest: Path) -> bytes:
    """The reference read: ``nbdcopy URI FILE`` (libnbd's own copier)."""
    subprocess.run(["nbdcopy", uri, str(dest)], check=True, capture_output=True, timeout=300)
    return dest.read_bytes()


# -- an nbdkit "sh" plugin serving an exact extent map -------------------------------------

EXTENT_MAP_SCRIPT = r'''#!{python}
"""nbdkit sh plugin (generated by tests/nbdservers.py): a read-only disk with an exact
extent map; each block-status reply carries at most MAX_PER_REPLY extents; data bytes
are data_byte(offset); optionally kills nbdkit when a read reaches KILL_AT."""
import os, signal, sys
SIZE = {size}
EXTENTS = {extents!r}   # (offset, length, "data" | "hole,zero" | "zero" | "hole")
MAX_PER_REPLY = {max_per_reply}
MULTI_CONN = {multi_conn}
KILL_AT = {kill_at}
BLOCK_SIZE = {block_size!r}

def data_byte(off):
    return (off // 4096) % 255 + 1

def pread(count, offset):
    if KILL_AT is not None and offset + count > KILL_AT:
        os.kill(os.getppid(), signal.SIGKILL)
        sys.exit(1)
    out = bytearray(count)
    for eo, el, et in EXTENTS:
        lo, hi = max(eo, offset), min(eo + el, offset + count)
        if lo < hi and "zero" not in et:
            for blk in range(lo - lo % 4096, hi, 4096):
                a, b = max(blk, lo), min(blk + 4096, hi)
                out[a - offset:b - offset] = bytes([data_byte(blk)]) * (b - a)
    sys.stdout.buffer.write(out)

def extents(count, offset):
    n = 0
    for eo, el, et in EXTENTS:
        if eo + el <= offset:
            continue
        if n >= MAX_PER_REPLY or eo >= offset + count:
            break
        start = max(eo, offset)
        print(start, eo + el - start, et)
        n += 1

m = sys.argv[1]
if m == "get_size":
    print(SIZE)
elif m == "thread_model":
    print("parallel")
elif m in ("can_extents",):
    sys.exit(0)
elif m == "can_multi_conn":
    sys.exit(0 if MULTI_CONN else 3)
elif m == "block_size" and BLOCK_SIZE:
    print(*BLOCK_SIZE)
elif m == "pread":
    pread(int(sys.argv[3]), int(sys.argv[4]))
elif m == "extents":
    extents(int(sys.argv[3]), int(sys.argv[4]))
elif m in ("open", "close", "load", "unload", "config", "config_complete"):
    sys.exit(0)
else:
    sys.exit(2)
'''


def extent_map_plugin(
    path: Path,
    size: int,
    extents: Sequence[tuple[int, int, str]],
    *,
    max_per_reply: int = 1,
    multi_conn: bool = True,
    kill_at: int | None = None,
    block_size: tuple[int, int, int] | None = None,
) -> Path:
    """Write an executable nbdkit ``sh`` plugin script serving ``extents`` exactly."""
    import sys

    path.write_text(
        EXTENT_MAP_SCRIPT.format(
            python=sys.executable,
            size=size,
            extents=list(extents),
            max_per_reply=max_per_reply,
            multi_conn=multi_conn,
            kill_at=kill_at,
            block_size=block_size,
        )
    )
    path.chmod(0o755)
    return path


def extent_map_bytes(size: int, extents: Sequence[tuple[int, int, str]]) -> bytes:
    """The bytes ``extent_map_plugin`` serves (same rule as its ``pread``)."""
    out = bytearray(size)
    for eo, el, et in extents:
        if "zero" in et:
            continue
        for blk in range(eo - eo % 4096, eo + el, 4096):
            a, b = max(blk, eo), min(blk + 4096, eo + el)
            out[a:b] = bytes([(blk // 4096) % 255 + 1]) * (b - a)
    return bytes(out)


def run_ok(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, **kw)


__all__ = [
    "NbdServer",
    "NbdServers",
    "Write",
    "expected_bytes",
    "extent_map_bytes",
    "extent_map_plugin",
    "make_image",
    "nbd_servers",
    "nbdcopy_to_file",
    "qemu_io",
    "requires",
    "run_ok",
    "write_commands",
]
