"""``LocalChunkStore``: chunk blobs as files ``<repo>/chunks/ab/cd/<32 hex digits>``."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from snapferry.engine.errors import CorruptionError, RepositoryError
from snapferry.engine.store.chunkfmt import HEADER_SIZE, ChunkHeader, check_blob, parse_header

CHUNKS_DIR = "chunks"
_TMP_SUFFIX = ".tmp"
_counter = itertools.count()
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


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

    Durability: ``put`` does not fsync (a per-chunk fsync cost more than compressing a
    1 MiB chunk here); ``sync``/``sync_all`` flush the whole filesystem (``syncfs``),
    which ``Repository.commit_restore_point`` runs before the manifest rename, the only
    commit point. A chunk torn by a crash before that is referenced by no manifest;
    writers must not dedup against it: use ``has_valid`` (not ``has``/``header``) on the
    dedup path and ``put(..., replace=True)`` to overwrite a torn file. See
    docs/FORMAT.md, *Commit protocol*.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.base = self.root / CHUNKS_DIR
        self._base_s = str(self.base)

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
        """A file exists under ``cid`` (it may be torn: see ``has_valid``)."""
        return os.path.exists(self.path_of(cid))

    def has_valid(self, cid: bytes, digest: bytes, raw_len: int) -> bool:
        """The dedup check: may data with BLAKE3 ``digest`` and length ``raw_len`` reuse
        the chunk stored under ``cid``?

        True: an intact chunk (header, size and CRC over the whole blob check out) holds
        exactly that data. False: no chunk, or a torn/damaged file (e.g. left by a
        crash before a commit): the caller encodes the data and stores it with
        ``put(cid, blob, replace=True)``. Raises ``CorruptionError`` when an intact
        chunk under this id holds *different* data (an XXH3 collision: never alias).
        Costs one failed ``open`` when absent, a read + CRC-32 of the blob when present.
        """
        blob = self._read(cid, missing_ok=True)
        if blob is None:
            return False
        try:
            hdr = check_blob(blob)
        except CorruptionError:
            return False
        if hdr.digest != digest or hdr.raw_len != raw_len:
            raise CorruptionError(
                f"chunk id {cid.hex()} already names different data (hash collision/alias): "
                "refusing to deduplicate; the backup was not committed"
            )
        return True

    def is_intact(self, cid: bytes) -> bool:
        """A chunk is stored under ``cid`` and passes ``check_blob`` (no decode)."""
        blob = self._read(cid, missing_ok=True)
        if blob is None:
            return False
        try:
            check_blob(blob)
        except CorruptionError:
            return False
        return True

    def put(self, cid: bytes, blob: bytes, *, replace: bool = False) -> bool:
        """Store ``blob`` under ``cid`` (temp file + rename; no fsync: see the class doc).

        Returns False when a chunk was already there (nothing written). With
        ``replace=True`` an existing file that is not intact (torn by a crash, damaged)
        is atomically replaced (returns True); an intact one is never overwritten.
        """
        final = self.path_of(cid)
        if os.path.exists(final) and (not replace or self.is_intact(cid)):
            return False
        d = final[: final.rindex("/")]
        uniq = f"{os.getpid()}.{threading.get_ident()}.{next(_counter)}"
        tmp = f"{d}/.{cid.hex()}.{uniq}{_TMP_SUFFIX}"
        try:
            try:
                fd = os.open(tmp, _CREATE_FLAGS, 0o444)
            except FileNotFoundError:  # first chunk in this ab/cd directory
                os.makedirs(d, exist_ok=True)
                fd = os.open(tmp, _CREATE_FLAGS, 0o444)
            try:
                write_all(fd, blob)
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
        return True

    def _read(self, cid: bytes, *, missing_ok: bool = False) -> bytes | None:
        try:
            fd = os.open(self.path_of(cid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise CorruptionError(f"chunk {cid.hex()} is missing from the repository") from None
        except OSError as e:
            raise io_error(f"reading chunk {cid.hex()}", e) from None
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size)
            if len(data) < size:  # short read (signals, odd filesystems): finish it
                parts = [data]
                got = len(data)
                while got < size:
                    more = os.read(fd, size - got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            return data
        except OSError as e:
            raise io_error(f"reading chunk {cid.hex()}", e) from None
        finally:
            os.close(fd)

    def get(self, cid: bytes) -> bytes:
        blob = self._read(cid)
        assert blob is not None
        return blob

    def header(self, cid: bytes) -> ChunkHeader:
        """The parsed header, after a size check (cheap: no payload read). Not enough
        for a dedup decision: a torn file may have its header but not its payload on
        disk; use ``has_valid``."""
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)

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
        """Make every chunk put so far durable, directory entries included.

        One ``syncfs`` of the store's filesystem: cheaper than an fsync per chunk and
        per directory (64 Ki ``ab/cd`` directories at most), and it also covers chunks
        put by other processes (the reader workers)."""
        try:
            syncfs(self.root)
        except OSError as e:
            raise io_error("syncing the chunk store", e) from None

    def sync_all(self) -> None:
        """Make every chunk written by ANY process durable (``syncfs`` of the store's
        filesystem): the coordinator calls this before the commit point."""
        self.sync()

    def stored_bytes(self) -> int:
        total = 0
        for path, _name in self._files():
            try:
                total += os.stat(path).st_size
            except FileNotFoundError:
                pass
        return total
