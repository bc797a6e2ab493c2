"""``LocalChunkStore``: chunk blobs as files ``<repo>/chunks/ab/cd/<32 hex digits>``."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from engine.errors import CorruptionError, RepositoryError
from engine.store.chunkfmt import HEADER_SIZE, ChunkHeader, parse_header

CHUNKS_DIR = "chunks"
_TMP_SUFFIX = ".tmp"
_counter = itertools.count()


def io_error(what: str, e: OSError) -> RepositoryError:
    """Turn an OSError into the one-line RepositoryError the user sees."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RepositoryError(f"repository disk is full while {what}")
    if e.errno == errno.EFBIG:
        return RepositoryError(f"file size limit reached while {what}")
    if e.errno == errno.EROFS:
        return RepositoryError(f"repository is on a read-only filesystem ({what})")
    return RepositoryError(f"I/O error while {what}: {e.strerror or e}")


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc: ctypes.CDLL | None = None


def syncfs(path: Path | str) -> None:
    """Flush the whole filesystem holding ``path`` (Linux ``syncfs(2)``; else ``sync``)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(_libc, "syncfs", None)
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


class LocalChunkStore:
    """Chunk store in a local (or any POSIX) directory tree.

    ``root`` is the repository directory; chunks live under ``root/chunks``.
    Safe for concurrent use from several processes (each builds its own object from
    the path) and from several threads of one process.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.base = self.root / CHUNKS_DIR
        self._base_s = str(self.base)
        self._touched: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"LocalChunkStore({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------
    def path_of(self, cid: bytes) -> str:
        h = cid.hex()
        return f"{self._base_s}/{h[:2]}/{h[2:4]}/{h}"

    # -- protocol ------------------------------------------------------------------
    def has(self, cid: bytes) -> bool:
        return os.path.exists(self.path_of(cid))

    def put(self, cid: bytes, blob: bytes) -> bool:
        final = self.path_of(cid)
        if os.path.exists(final):
            return False
        d = os.path.dirname(final)
        uniq = f"{os.getpid()}.{threading.get_ident()}.{next(_counter)}"
        tmp = f"{d}/.{cid.hex()}.{uniq}{_TMP_SUFFIX}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            except FileNotFoundError:
                self._make_dirs(d)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                write_all(fd, blob)
                os.fsync(fd)
            finally:
                os.close(fd)
            # rename over a concurrent writer's identical file is harmless
            os.rename(tmp, final)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise io_error(f"storing chunk {cid.hex()}", e) from None
        with self._lock:
            self._touched.add(d)
        return True

    def _make_dirs(self, d: str) -> None:
        mid = os.path.dirname(d)
        with self._lock:
            if not os.path.isdir(mid):
                os.makedirs(mid, exist_ok=True)
                self._touched.add(self._base_s)
            os.makedirs(d, exist_ok=True)
            self._touched.add(mid)

    def get(self, cid: bytes) -> bytes:
        try:
            with open(self.path_of(cid), "rb", buffering=0) as f:
                return f.read()
        except FileNotFoundError:
            raise CorruptionError(f"chunk {cid.hex()} is missing from the repository") from None
        except OSError as e:
            raise io_error(f"reading chunk {cid.hex()}", e) from None

    def header(self, cid: bytes) -> ChunkHeader:
        try:
            fd = os.open(self.path_of(cid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptionError(f"chunk {cid.hex()} is missing from the repository") from None
        try:
            prefix = os.pread(fd, HEADER_SIZE, 0)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        try:
            hdr = parse_header(prefix)
        except CorruptionError as e:
            raise CorruptionError(f"chunk {cid.hex()}: {e}") from None
        if size != HEADER_SIZE + hdr.stored_len:
            raise CorruptionError(
                f"chunk {cid.hex()} is {size} bytes, header says {HEADER_SIZE + hdr.stored_len}"
            )
        return hdr

    def delete(self, cid: bytes) -> None:
        p = self.path_of(cid)
        try:
            os.unlink(p)
        except FileNotFoundError:
            return
        with self._lock:
            self._touched.add(os.path.dirname(p))

    def iterate(self) -> Iterator[bytes]:
        for _path, name in self._files():
            yield bytes.fromhex(name)

    def _files(self) -> Iterator[tuple[str, str]]:
        try:
            tops = sorted(os.listdir(self._base_s))
        except FileNotFoundError:
            return
        for a in tops:
            pa = f"{self._base_s}/{a}"
            if len(a) != 2 or not os.path.isdir(pa):
                continue
            for b in sorted(os.listdir(pa)):
                pb = f"{pa}/{b}"
                if len(b) != 2 or not os.path.isdir(pb):
                    continue
                with os.scandir(pb) as it:
                    for e in it:
                        n = e.name
                        if len(n) == 32 and not n.startswith("."):
                            yield e.path, n

    def temp_files(self) -> list[str]:
        """Leftover temp files of interrupted puts (safe to delete when no backup runs)."""
        out: list[str] = []
        for dirpath, _dirs, files in os.walk(self._base_s):
            out.extend(f"{dirpath}/{f}" for f in files if f.endswith(_TMP_SUFFIX))
        return out

    def sync(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
        try:
            for d in sorted(touched, key=len, reverse=True):
                fsync_dir(d)
        except OSError as e:
            self._touched |= touched
            raise io_error("syncing the chunk store", e) from None

    def sync_all(self) -> None:
        """Make every chunk written by ANY process durable (``syncfs`` of the store's
        filesystem): the coordinator calls this before the commit point, so directory
        entries of chunks put by worker processes are covered too."""
        self.sync()
        try:
            syncfs(self.root)
        except OSError as e:
            raise io_error("syncing the chunk store", e) from None

    def stored_bytes(self) -> int:
        total = 0
        for path, _name in self._files():
            try:
                total += os.stat(path).st_size
            except FileNotFoundError:
                pass
        return total
