"""cffi (ABI mode) binding of VMware's libvixDiskLib (VDDK), loaded at run time.

VDDK is proprietary and never shipped with snapferry: the user installs it and names
its directory (``--vddk-libdir``). We ``dlopen`` the library by its full path (setting
``LD_LIBRARY_PATH`` after the process started has no effect on the loader), trying
``lib64/`` first (the VDDK tarball layout) and then the directory itself.

Process rules (VDDK starts background threads in ``InitEx``):

* ``VixDiskLib_InitEx`` runs exactly once per process, on the first
  ``VddkLibrary.load()`` in that process; ``VixDiskLib_Exit`` runs at interpreter exit.
* A process forked from one that had loaded VDDK must not use it: the library state
  is inherited but its threads are not. ``load()`` detects this (the recorded pid
  differs) and raises ``SourceError``; reader pools must start VDDK workers with the
  ``spawn`` (or ``forkserver``) start method, and each worker opens its own
  connection and handle.

Log callbacks: VDDK calls them with ``(fmt, va_list)`` from its own threads, which a
cffi Python callback cannot handle safely. By default we pass NULL (VDDK then logs
through its default handlers / its own log file, configured with ``configFile``); with
``log_to_stderr=True`` we pass libc's ``vwarnx``, a C function with exactly that
signature, so VDDK's messages go to stderr without ever entering Python.

Every failure is raised as ``VddkError`` (a ``SourceError``) whose message holds the
VDDK call, ``GetErrorText`` of the error code masked to its low 16 bits, and the code.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cffi import FFI

from snapferry.engine.errors import SourceError
from snapferry.native import vddk_cdef as c

SECTOR_SIZE = c.VIXDISKLIB_SECTOR_SIZE
MAX_READ_SECTORS = (2 * 1024 * 1024) // SECTOR_SIZE  # at most 2 MiB per Read call
MIN_CHUNK_SECTORS = c.VIXDISKLIB_MIN_CHUNK_SIZE
MAX_CHUNKS_PER_QUERY = c.VIXDISKLIB_MAX_CHUNK_NUMBER

# Tried in this order under libdir: newest first, VDDK's lib64/ layout first.
SONAMES = (
    "libvixDiskLib.so.8",
    "libvixDiskLib.so.7",
    "libvixDiskLib.so.6",
    "libvixDiskLib.so",
)

ffi = FFI()
ffi.cdef(c.CDEF)
ffi.cdef(c.LIBC_CDEF)


class VddkError(SourceError):
    """A VDDK call failed. ``code`` is the VIX error code (low 16 bits)."""

    def __init__(self, message: str, code: int = 0, raw: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.raw = raw

    def __reduce__(self) -> tuple[Any, ...]:  # keep code/raw across process boundaries
        return (type(self), (str(self), self.code, self.raw))


def error_code(err: int) -> int:
    """The VIX error code of a ``VixError`` (the higher bits carry extra detail)."""
    return err & c.VIX_ERROR_CODE_MASK


@dataclass(frozen=True)
class DiskInfo:
    capacity_sectors: int
    logical_sector_size: int
    physical_sector_size: int
    num_links: int
    adapter_type: int
    uuid: str | None
    parent_hint: str | None

    @property
    def size(self) -> int:
        return self.capacity_sectors * SECTOR_SIZE


def find_library(libdir: str | os.PathLike[str]) -> Path:
    """The path of libvixDiskLib under ``libdir``, or ``SourceError`` with the fix."""
    d = Path(libdir)
    for sub in ("lib64", "."):
        for name in SONAMES:
            p = d / sub / name
            if p.is_file():
                return p.resolve()
    raise SourceError(
        f"VDDK not found in {d}: install the VMware VDDK and pass --vddk-libdir"
    )


def library_dir(libdir: str | os.PathLike[str]) -> Path:
    """The directory holding libvixDiskLib (``libdir/lib64`` in the VDDK tarball)."""
    return find_library(libdir).parent


REEXEC_MARK = "SNAPFERRY_VDDK_REEXEC"


def reexec_if_needed(libdir: str | os.PathLike[str]) -> None:
    """Re-execute this program with VDDK's directory on ``LD_LIBRARY_PATH``.

    The real libvixDiskLib needs its bundled libraries (OpenSSL, libcurl, ...) from
    its own directory, which the loader only searches when ``LD_LIBRARY_PATH`` said so
    when the process started (nbdkit's vddk plugin re-executes itself for the same
    reason). Call early in the CLI, before any thread or child is started; returns
    when nothing needs doing (already on the path, or already re-executed once).
    Processes spawned later inherit the environment, so workers need nothing more.
    """
    d = str(library_dir(libdir))
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if d in current.split(":") or os.environ.get(REEXEC_MARK):
        return
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{d}:{current}" if current else d
    env[REEXEC_MARK] = "1"
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


class VddkLibrary:
    """The loaded, initialised libvixDiskLib of this process (one per process)."""

    _instance: VddkLibrary | None = None
    _lock = threading.Lock()

    def __init__(self, path: Path, libdir: Path, lib: Any, pid: int) -> None:
        self.path = path
        self.libdir = libdir
        self._lib = lib
        self.pid = pid
        self.initialised = False
        self.has_query_allocated_blocks = _has_symbol(lib, "VixDiskLib_QueryAllocatedBlocks")
        self._libc: Any = None

    # ---- loading ---------------------------------------------------------------

    @classmethod
    def load(
        cls,
        libdir: str | os.PathLike[str],
        *,
        config_file: str | None = None,
        log_to_stderr: bool = False,
    ) -> VddkLibrary:
        """Load VDDK from ``libdir`` and run ``InitEx`` (first call in this process).

        Later calls in the same process return the same object (``libdir`` must name
        the same library). In a process forked after the load, raises ``SourceError``.
        """
        path = find_library(libdir)
        with cls._lock:
            inst = cls._instance
            if inst is not None:
                if inst.pid != os.getpid():
                    raise SourceError(
                        f"VDDK was initialised in process {inst.pid} and this process "
                        f"({os.getpid()}) was forked from it; VDDK readers must run in "
                        "processes started with the 'spawn' method"
                    )
                if inst.path != path:
                    raise SourceError(
                        f"VDDK is already loaded from {inst.libdir} in this process; "
                        f"cannot also load {Path(libdir)}"
                    )
                return inst
            try:
                lib = ffi.dlopen(str(path))
            except OSError as e:
                raise SourceError(f"VDDK in {Path(libdir)} could not be loaded: {e}") from e
            for name in c.REQUIRED_FUNCTIONS:
                if not _has_symbol(lib, name):
                    raise SourceError(
                        f"{path} is not a usable VDDK: symbol {name} is missing"
                    )
            inst = cls(path, Path(libdir).resolve(), lib, os.getpid())
            inst._init(config_file, log_to_stderr)
            cls._instance = inst
            atexit.register(inst._exit_at_shutdown)
            return inst

    @classmethod
    def loaded(cls) -> VddkLibrary | None:
        """The library loaded in this process, if any (None in a forked child)."""
        inst = cls._instance
        return inst if inst is not None and inst.pid == os.getpid() else None

    def _init(self, config_file: str | None, log_to_stderr: bool) -> None:
        log: Any = ffi.NULL
        if log_to_stderr:
            self._libc = ffi.dlopen(None)
            log = ffi.cast("void *", self._libc.vwarnx)
        err = self._lib.VixDiskLib_InitEx(
            c.VDDK_API_MAJOR,
            c.VDDK_API_MINOR,
            log,
            log,
            log,
            str(self.libdir).encode(),
            config_file.encode() if config_file else ffi.NULL,
        )
        self.check(err, "InitEx")
        self.initialised = True

    def _exit_at_shutdown(self) -> None:
        if self.initialised and self.pid == os.getpid():
            self.initialised = False
            self._lib.VixDiskLib_Exit()

    # ---- errors ----------------------------------------------------------------

    def error_text(self, err: int) -> str:
        """VDDK's text for ``err`` (masked to the low 16 bits first)."""
        p = self._lib.VixDiskLib_GetErrorText(error_code(err), ffi.NULL)
        if p == ffi.NULL:
            return "unknown error"
        try:
            return ffi.string(p).decode("utf-8", "replace").strip()
        finally:
            self._lib.VixDiskLib_FreeErrorText(p)

    def check(self, err: int, what: str) -> None:
        if err != c.VIX_OK:
            code = error_code(err)
            raise VddkError(
                f"VDDK {what} failed: {self.error_text(err)} (VIX error {code})",
                code=code,
                raw=err,
            )

    # ---- connections -----------------------------------------------------------

    def connect(
        self,
        *,
        server: str,
        vm_moref: str,
        user: str,
        password: str,
        thumbprint: str | None = None,
        snapshot_moref: str | None = None,
        transport_modes: str | None = None,
        port: int = 0,
        nfc_host_port: int = 0,
        read_only: bool = True,
    ) -> VddkConnection:
        """``VixDiskLib_ConnectEx`` to a VM (``vmxSpec = "moref=" + vm_moref``)."""
        self._check_process()
        keep: list[Any] = []  # C strings alive for the duration of the call

        def cstr(s: str | None) -> Any:
            if s is None:
                return ffi.NULL
            b = ffi.new("char[]", s.encode())
            keep.append(b)
            return b

        params = ffi.new("VixDiskLibConnectParams *")
        params.vmxSpec = cstr(f"moref={vm_moref}")
        params.serverName = cstr(server)
        params.thumbPrint = cstr(thumbprint)
        params.credType = c.VIXDISKLIB_CRED_UID
        params.creds.uid.userName = cstr(user)
        pw_bytes = password.encode()
        pw = ffi.new("char[]", pw_bytes)
        params.creds.uid.password = pw
        params.port = port
        params.nfcHostPort = nfc_host_port
        params.specType = c.VIXDISKLIB_SPEC_VMX
        conn = ffi.new("VixDiskLibConnection *")
        err = self._lib.VixDiskLib_ConnectEx(
            params,
            b"\x01" if read_only else b"\x00",
            cstr(snapshot_moref),
            cstr(transport_modes),
            conn,
        )
        # Do not leave the password lying in memory we own longer than needed.
        ffi.memmove(pw, b"\x00" * len(pw_bytes), len(pw_bytes))
        self.check(err, f"ConnectEx to {server} (moref={vm_moref})")
        return VddkConnection(self, conn[0])

    def _check_process(self) -> None:
        if self.pid != os.getpid() or not self.initialised:
            raise SourceError(
                f"VDDK was initialised in process {self.pid}, not in this process "
                f"({os.getpid()}); VDDK readers must run in processes started with 'spawn'"
            )

    @property
    def lib(self) -> Any:
        return self._lib


def _has_symbol(lib: Any, name: str) -> bool:
    try:
        getattr(lib, name)
    except AttributeError:
        return False
    return True


class VddkConnection:
    """One ``VixDiskLibConnection``; open disks on it, then ``disconnect()``."""

    def __init__(self, vddk: VddkLibrary, conn: Any) -> None:
        self._vddk = vddk
        self._conn: Any = conn

    def open(self, path: str, flags: int = c.VIXDISKLIB_FLAG_OPEN_READ_ONLY) -> VddkHandle:
        """``VixDiskLib_Open`` of a disk path such as ``"[datastore1] vm/vm.vmdk"``."""
        if self._conn is None:
            raise SourceError("VDDK connection is closed")
        self._vddk._check_process()
        h = ffi.new("VixDiskLibHandle *")
        err = self._vddk.lib.VixDiskLib_Open(self._conn, path.encode(), flags, h)
        self._vddk.check(err, f"Open of {path}")
        return VddkHandle(self._vddk, h[0], path)

    def disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._vddk.pid == os.getpid():
            self._vddk.check(self._vddk.lib.VixDiskLib_Disconnect(conn), "Disconnect")

    def __enter__(self) -> VddkConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


class VddkHandle:
    """An open disk: info, sector reads, allocated-block queries."""

    def __init__(self, vddk: VddkLibrary, handle: Any, path: str) -> None:
        self._vddk = vddk
        self._h: Any = handle
        self.path = path

    def _handle(self) -> Any:
        if self._h is None:
            raise SourceError(f"VDDK disk {self.path} is closed")
        return self._h

    def info(self) -> DiskInfo:
        pp = ffi.new("VixDiskLibInfo **")
        lib = self._vddk.lib
        self._vddk.check(lib.VixDiskLib_GetInfo(self._handle(), pp), f"GetInfo of {self.path}")
        p = pp[0]
        try:
            return DiskInfo(
                capacity_sectors=int(p.capacity),
                logical_sector_size=int(p.logicalSectorSize) or SECTOR_SIZE,
                physical_sector_size=int(p.physicalSectorSize) or SECTOR_SIZE,
                num_links=int(p.numLinks),
                adapter_type=int(p.adapterType),
                uuid=_opt_str(p.uuid),
                parent_hint=_opt_str(p.parentFileNameHint),
            )
        finally:
            lib.VixDiskLib_FreeInfo(p)

    def transport_mode(self) -> str:
        p = self._vddk.lib.VixDiskLib_GetTransportMode(self._handle())
        return _opt_str(p) or "unknown"

    def read_sectors(self, start_sector: int, buf: Any) -> None:
        """Fill ``buf`` (writable buffer, a multiple of 512 bytes) from ``start_sector``.

        Issues ``VixDiskLib_Read`` calls of at most 2 MiB straight into ``buf``.
        """
        n = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
        if n % SECTOR_SIZE:
            raise ValueError("read_sectors needs a whole number of sectors")
        if n == 0:
            return
        ptr = ffi.from_buffer("unsigned char[]", buf, require_writable=True)
        self.read_sectors_ptr(start_sector, n // SECTOR_SIZE, ptr)

    def read_sectors_ptr(self, start_sector: int, nr_sectors: int, ptr: Any) -> None:
        """Read ``nr_sectors`` from ``start_sector`` into the cffi pointer ``ptr``."""
        h = self._handle()
        read = self._vddk.lib.VixDiskLib_Read
        done = 0
        while done < nr_sectors:
            k = min(MAX_READ_SECTORS, nr_sectors - done)
            err = read(h, start_sector + done, k, ptr + done * SECTOR_SIZE)
            if err:
                self._vddk.check(
                    err,
                    f"Read of {self.path} at sector {start_sector + done} (+{k})",
                )
            done += k

    def allocated_blocks(
        self, start_sector: int, nr_sectors: int, chunk_sectors: int = MIN_CHUNK_SECTORS
    ) -> list[tuple[int, int]]:
        """Allocated ``(start_sector, nr_sectors)`` ranges in ``[start, start+nr)``.

        Both bounds must be multiples of ``chunk_sectors`` (>= 128); queries larger
        than VDDK's chunk limit are split. Raises ``VddkError`` with code
        ``VIX_E_NOT_SUPPORTED`` when the library predates 6.7.
        """
        if not self._vddk.has_query_allocated_blocks:
            raise VddkError(
                "VDDK QueryAllocatedBlocks is not available (VDDK < 6.7)",
                code=c.VIX_E_NOT_SUPPORTED,
            )
        if chunk_sectors < MIN_CHUNK_SECTORS:
            raise ValueError(f"chunk size must be at least {MIN_CHUNK_SECTORS} sectors")
        if start_sector % chunk_sectors or nr_sectors % chunk_sectors:
            raise ValueError("query range must be chunk-aligned")
        lib = self._vddk.lib
        h = self._handle()
        out: list[tuple[int, int]] = []
        pos, end = start_sector, start_sector + nr_sectors
        pp = ffi.new("VixDiskLibBlockList **")
        while pos < end:
            n = min(end - pos, MAX_CHUNKS_PER_QUERY * chunk_sectors)
            err = lib.VixDiskLib_QueryAllocatedBlocks(h, pos, n, chunk_sectors, pp)
            self._vddk.check(err, f"QueryAllocatedBlocks of {self.path} at sector {pos}")
            bl = pp[0]
            try:
                count = int(bl.numBlocks)
                blocks = ffi.cast("VixDiskLibBlock *", bl.blocks)
                for i in range(count):
                    off, ln = int(blocks[i].offset), int(blocks[i].length)
                    if out and out[-1][0] + out[-1][1] == off:
                        out[-1] = (out[-1][0], out[-1][1] + ln)
                    else:
                        out.append((off, ln))
            finally:
                lib.VixDiskLib_FreeBlockList(bl)
            pos += n
        return out

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None and self._vddk.pid == os.getpid():
            self._vddk.check(self._vddk.lib.VixDiskLib_Close(h), f"Close of {self.path}")

    def __enter__(self) -> VddkHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _opt_str(p: Any) -> str | None:
    if p == ffi.NULL:
        return None
    return str(ffi.string(p).decode("utf-8", "replace"))
