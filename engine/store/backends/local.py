"""``LocalBackend``: repository objects as files of one local (POSIX) directory tree.

The only module that touches ``os`` for repository data. Layout (docs/FORMAT.md)::

    <root>/config                 kind "config", name "config"
    <root>/data/<ab>/<name>       kind "data" (packs), fanned out by the name's first 2 chars
    <root>/<kind>/<name>          every other kind

Safety rules it enforces whatever the caller does:

* directories 0700 and files 0600 whatever the umask (explicit ``fchmod``);
* no symlink inside the repository is followed: every directory is opened with
  ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent's descriptor, every file with
  ``O_NOFOLLOW`` relative to its directory's descriptor (the root itself may be a link:
  that is where the user put the repository);
* create-if-absent is atomic: the object is written to a unique temp file, fsynced,
  then ``link``-ed to its name (``link`` fails when the name exists), then the
  directory is fsynced; a crash leaves at most a temp file (``leftovers``);
* every ``save`` is durable when it returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from snapferry.engine.errors import RepositoryError
from snapferry.engine.store.backend import (
    KINDS,
    Backend,
    BackendProperties,
    ObjectInfo,
    ObjectMissing,
    check_name,
)

TMP_PREFIX = ".tmp-"
DIR_MODE = 0o700
FILE_MODE = 0o600
_FANOUT_KINDS = ("data",)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 64  # open pack files kept for ranged reads (restore reads many chunks per pack)


def io_error(what: str, e: OSError) -> RepositoryError:
    """Turn an OSError into the one-line RepositoryError the user sees."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RepositoryError(f"repository disk is full while {what}")
    if e.errno == errno.EFBIG:
        return RepositoryError(f"file size limit reached while {what}")
    if e.errno == errno.EROFS:
        return RepositoryError(f"repository is on a read-only filesystem ({what})")
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return RepositoryError(f"refusing to follow a symbolic link inside the repository ({what})")
    if e.errno == errno.EACCES:
        return RepositoryError(f"permission denied while {what}")
    return RepositoryError(f"I/O error while {what}: {e.strerror or e}")


_libc: ctypes.CDLL | None = None


def _syncfs(fd: int) -> None:
    """Linux ``syncfs(2)`` of the filesystem holding ``fd`` (``sync`` elsewhere)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(_libc, "syncfs", None)
    if fn is None:
        os.sync()
        return
    if fn(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        mv = mv[os.write(fd, mv) :]


@dataclass(frozen=True, slots=True)
class LocalBackendSpec:
    """Picklable: reopens the backend at ``root`` in a worker process."""

    root: str

    def open(self) -> LocalBackend:
        return LocalBackend(self.root)


class LocalBackend:
    """Objects as files under ``root`` (see the module doc). Thread-safe."""

    def __init__(self, root: str, *, create: bool = False) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._dirs: dict[str, int] = {}
        self._files: OrderedDict[tuple[str, str], int] = OrderedDict()
        try:
            if create:
                os.makedirs(root, mode=DIR_MODE, exist_ok=True)
            self._rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if create:
                os.fchmod(self._rootfd, DIR_MODE)
        except FileNotFoundError:
            raise RepositoryError(f"no repository at {root} (path does not exist)") from None
        except FileExistsError:
            raise RepositoryError(f"{root} exists and is not a directory") from None
        except NotADirectoryError:
            raise RepositoryError(
                f"{root} is not a snapferry repository (not a directory)"
            ) from None
        except OSError as e:
            raise io_error(f"opening the repository at {root}", e) from None

    # -- the Backend protocol --------------------------------------------------------
    @property
    def properties(self) -> BackendProperties:
        return BackendProperties(
            max_connections=max(2, min(8, os.cpu_count() or 2)),
            atomic_create_if_absent=True,
            needs_sync=False,
            durable_save=True,
        )

    @property
    def location(self) -> str:
        return self.root

    def spec(self) -> LocalBackendSpec:
        return LocalBackendSpec(self.root)

    def __getstate__(self) -> dict[str, str]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"LocalBackend({self.root!r})"

    def save(
        self, kind: str, name: str, data: bytes | bytearray | memoryview, *, if_absent: bool = True
    ) -> bool:
        check_name(kind, name)
        what = f"writing {kind}/{name}"
        try:
            made = self._dir_of(kind, name, create=True)
            assert made is not None
            dfd = made
            if if_absent and self._exists(dfd, name):
                return False
            tmp = f"{TMP_PREFIX}{name[:40]}-{os.getpid()}-{secrets.token_hex(4)}"
            fd = os.open(tmp, _O_CREATE, FILE_MODE, dir_fd=dfd)
            try:
                try:
                    os.fchmod(fd, FILE_MODE)
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if if_absent:
                    try:
                        os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                    except FileExistsError:
                        return False
                else:
                    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                    tmp = ""
            finally:
                if tmp:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
            os.fsync(dfd)
        except OSError as e:
            raise io_error(what, e) from None
        return True

    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(kind, name)
        try:
            fd = self._open_file(kind, name)
            try:
                if length is None:
                    length = max(0, os.fstat(fd).st_size - offset)
                data = os.pread(fd, length, offset)
                if len(data) < length:  # short read: finish it (or hit the end)
                    parts = [data]
                    got = len(data)
                    while got < length:
                        more = os.pread(fd, length - got, offset + got)
                        if not more:
                            break
                        parts.append(more)
                        got += len(more)
                    data = b"".join(parts)
                return data
            finally:
                self._release_file(kind, name, fd)
        except ObjectMissing:
            raise
        except OSError as e:
            raise io_error(f"reading {kind}/{name}", e) from None

    def objects(self, kind: str, prefix: str = "") -> Iterator[ObjectInfo]:
        if kind not in KINDS:
            raise ValueError(f"unknown object kind {kind!r}")
        if kind == "config":
            info = self.stat("config", "config")
            if info is not None and info.name.startswith(prefix):
                yield info
            return
        try:
            base = self._kind_dir(kind, create=False)
        except OSError as e:
            raise io_error(f"listing {kind}", e) from None
        if base is None:
            return
        if kind in _FANOUT_KINDS:
            for sub in sorted(self._names(base)):
                if sub.startswith(TMP_PREFIX) or (len(prefix) >= 2 and sub != prefix[:2]):
                    continue
                try:
                    sfd = self._subdir(kind, sub, create=False)
                except OSError as e:
                    raise io_error(f"listing {kind}/{sub}", e) from None
                if sfd is not None:
                    yield from self._list_dir(kind, sfd, prefix)
        else:
            yield from self._list_dir(kind, base, prefix)

    def stat(self, kind: str, name: str) -> ObjectInfo | None:
        check_name(kind, name)
        try:
            dfd = self._dir_of(kind, name, create=False)
            if dfd is None:
                return None
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise io_error(f"reading {kind}/{name}", e) from None
        if not stat.S_ISREG(st.st_mode):
            raise RepositoryError(
                f"refusing to follow a symbolic link or special file inside the repository "
                f"({kind}/{name})"
            )
        return ObjectInfo(kind, name, st.st_size)

    def remove(self, kind: str, name: str) -> None:
        check_name(kind, name)
        self._forget_file(kind, name)
        try:
            dfd = self._dir_of(kind, name, create=False)
            if dfd is None:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)
                os.fsync(dfd)
        except OSError as e:
            raise io_error(f"removing {kind}/{name}", e) from None

    def sync(self) -> None:
        try:
            _syncfs(self._rootfd)
        except OSError as e:
            raise io_error("syncing the repository", e) from None

    def leftovers(self) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for kind in KINDS:
            if kind == "config":
                fds = [("config", self._rootfd)]
            else:
                try:
                    base = self._kind_dir(kind, create=False)
                except OSError:
                    continue
                if base is None:
                    continue
                fds = [(kind, base)]
                if kind in _FANOUT_KINDS:
                    for sub in self._names(base):
                        if not sub.startswith(TMP_PREFIX):
                            with contextlib.suppress(OSError):
                                sfd = self._subdir(kind, sub, create=False)
                                if sfd is not None:
                                    fds.append((f"{kind}/{sub}", sfd))
            for where, dfd in fds:
                for n in self._names(dfd):
                    if n.startswith(TMP_PREFIX):
                        try:
                            size = os.stat(n, dir_fd=dfd, follow_symlinks=False).st_size
                        except OSError:
                            continue
                        out.append(ObjectInfo(where, n, size))
        return out

    def remove_leftover(self, info: ObjectInfo) -> None:
        if not info.name.startswith(TMP_PREFIX) or "/" in info.name:
            raise ValueError(f"not a leftover: {info.name!r}")
        kind, _, sub = info.kind.partition("/")
        try:
            if info.kind == "config":
                dfd: int | None = self._rootfd
            elif sub:
                dfd = self._subdir(kind, sub, create=False)
            else:
                dfd = self._kind_dir(kind, create=False)
            if dfd is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(info.name, dir_fd=dfd)
        except OSError as e:
            raise io_error(f"removing {info.kind}/{info.name}", e) from None

    def close(self) -> None:
        with self._lock:
            for fd in self._files.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._files.clear()
            for fd in self._dirs.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._dirs.clear()
            with contextlib.suppress(OSError):
                os.close(self._rootfd)
            self._rootfd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- extras for this backend only ---------------------------------------------------
    def is_empty(self) -> bool:
        return not self._names(self._rootfd)

    # -- directories and descriptors ---------------------------------------------------
    @staticmethod
    def _names(dfd: int) -> list[str]:
        return os.listdir(dfd)

    @staticmethod
    def _exists(dfd: int, name: str) -> bool:
        try:
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _open_dir(self, key: str, parent: int, name: str, create: bool) -> int | None:
        with self._lock:
            fd = self._dirs.get(key)
            if fd is not None:
                return fd
            try:
                fd = os.open(name, _O_DIR, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    return None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, DIR_MODE, dir_fd=parent)
                    os.fsync(parent)
                fd = os.open(name, _O_DIR, dir_fd=parent)
                os.fchmod(fd, DIR_MODE)
            self._dirs[key] = fd
            return fd

    def _kind_dir(self, kind: str, create: bool) -> int | None:
        return self._open_dir(kind, self._rootfd, kind, create)

    def _subdir(self, kind: str, sub: str, create: bool) -> int | None:
        base = self._kind_dir(kind, create)
        if base is None:
            return None
        return self._open_dir(f"{kind}/{sub}", base, sub, create)

    def _dir_of(self, kind: str, name: str, *, create: bool) -> int | None:
        if kind == "config":
            if name != "config":
                raise ValueError("the config object is named 'config'")
            return self._rootfd
        if kind in _FANOUT_KINDS:
            fd = self._subdir(kind, name[:2], create)
        else:
            fd = self._kind_dir(kind, create)
        return fd

    def _list_dir(self, kind: str, dfd: int, prefix: str) -> Iterator[ObjectInfo]:
        try:
            names = self._names(dfd)
        except OSError as e:
            raise io_error(f"listing {kind}", e) from None
        for n in sorted(names):
            if n.startswith((TMP_PREFIX, ".")) or not n.startswith(prefix):
                continue
            try:
                st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise io_error(f"listing {kind}", e) from None
            if not stat.S_ISREG(st.st_mode):
                continue  # a link or directory planted inside the repository: not an object
            yield ObjectInfo(kind, n, st.st_size)

    def _open_file(self, kind: str, name: str) -> int:
        key = (kind, name)
        with self._lock:
            fd = self._files.pop(key, None)
        if fd is not None:
            return fd
        dfd = self._dir_of(kind, name, create=False)
        if dfd is None:
            raise ObjectMissing(f"{kind}/{name} is missing from the repository")
        try:
            return os.open(name, _O_READ, dir_fd=dfd)
        except FileNotFoundError:
            raise ObjectMissing(f"{kind}/{name} is missing from the repository") from None

    def _release_file(self, kind: str, name: str, fd: int) -> None:
        """Keep a data file open for the next ranged read (restore reads a pack many
        times); other kinds are read once and closed."""
        if kind != "data":
            os.close(fd)
            return
        with self._lock:
            if (kind, name) in self._files:
                os.close(fd)
                return
            self._files[(kind, name)] = fd
            while len(self._files) > _FD_CACHE:
                _k, old = self._files.popitem(last=False)
                os.close(old)

    def _forget_file(self, kind: str, name: str) -> None:
        with self._lock:
            fd = self._files.pop((kind, name), None)
        if fd is not None:
            os.close(fd)


if TYPE_CHECKING:  # static check that LocalBackend fits the Protocol
    _check: Backend = LocalBackend("")
