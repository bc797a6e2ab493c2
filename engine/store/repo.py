"""``Repository``: a directory holding config, chunks, restore points and locks.

Layout (format 1, see docs/FORMAT.md)::

    <repo>/config                          JSON: format, kind, id, chunk_size, seed, ...
    <repo>/chunks/ab/cd/<32 hex>           chunk blobs (snapferry.engine.store.chunkfmt)
    <repo>/backups/<vm>/<backup id>/<disk>.idx
    <repo>/backups/<vm>/<backup id>/manifest.json   <- the commit point
    <repo>/locks/exclusive.lock            held while a backup writes
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from snapferry.engine.errors import CorruptionError, RepositoryError, UsageError
from snapferry.engine.store.index import DiskIndex
from snapferry.engine.store.local import LocalChunkStore, fsync_dir, io_error, write_all
from snapferry.engine.store.manifest import Manifest

REPO_FORMAT = 1
REPO_KIND = "snapferry-repository"
DEFAULT_CHUNK_SIZE = 256 << 10  # 256 KiB: see docs/chunk-size.md
DEFAULT_ZSTD_LEVEL = 1  # see docs/chunk-size.md
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 4 << 20
CONFIG = "config"
BACKUPS = "backups"
LOCKS = "locks"
MANIFEST = "manifest.json"
LOCK_NAME = "exclusive.lock"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


def _write_file_durably(path: Path, data: bytes) -> None:
    """temp + fsync + rename + fsync(dir): ``path`` holds old or new data, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise io_error(f"writing {path.name}", e) from None


NAME_MAX_QUOTED = 200


def path_component(name: str) -> str:
    """A VM or disk name made safe as a single path component (reversible quoting)."""
    if not name or name in (".", ".."):
        raise UsageError(f"invalid name {name!r}")
    q = quote(name, safe="-_.+@=,")
    if len(q) > NAME_MAX_QUOTED:  # a file name holds 255 bytes; leave room for suffixes
        raise UsageError(f"name too long: {len(name)} characters ({len(q)} bytes quoted; "
                         f"at most {NAME_MAX_QUOTED})")
    return "%2E" + q[1:] if q.startswith(".") else q


def _pid_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is not None:
        now = _pid_start_time(pid)
        if now is not None and now != start:
            return False  # pid reused by another process
    return True


class Repository:
    """An open snapferry repository. Build with ``init`` or ``open``."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path = path
        self.config = config
        self.chunk_size: int = config["chunk_size"]
        self.seed: int = int(config["seed"], 16)
        self.zstd_level: int = config["zstd_level"]
        self.id: str = config["id"]
        self.store = LocalChunkStore(path)

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r})"

    # -- creation / opening --------------------------------------------------------
    @classmethod
    def init(
        cls,
        path: Path | str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
    ) -> Repository:
        path = Path(path)
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise UsageError(
                f"chunk size must be a power of two from {MIN_CHUNK_SIZE >> 10} KiB "
                f"to {MAX_CHUNK_SIZE >> 20} MiB, not {chunk_size}"
            )
        if not 1 <= zstd_level <= 22:
            raise UsageError(f"zstd level must be 1..22, not {zstd_level}")
        if path.exists():
            if not path.is_dir():
                raise RepositoryError(f"{path} exists and is not a directory")
            if any(path.iterdir()):
                raise RepositoryError(f"{path} is not empty; a new repository needs an empty dir")
        config = {
            "format": REPO_FORMAT,
            "kind": REPO_KIND,
            "id": str(uuid.uuid4()),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "chunk_size": chunk_size,
            "seed": f"{secrets.randbits(64):016x}",
            "id_hash": "xxh3-128",
            "digest": "blake3-256",
            "compression": "zstd",
            "zstd_level": zstd_level,
        }
        try:
            path.mkdir(parents=True, exist_ok=True)
            for sub in ("chunks", BACKUPS, LOCKS):
                (path / sub).mkdir()
            _write_file_durably(path / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
            fsync_dir(path)
            fsync_dir(path.parent)
        except OSError as e:
            raise io_error(f"creating the repository at {path}", e) from None
        return cls(path, config)

    @classmethod
    def open(cls, path: Path | str) -> Repository:
        path = Path(path)
        if not path.exists():
            raise RepositoryError(f"no repository at {path} (path does not exist)")
        if not path.is_dir():
            raise RepositoryError(f"{path} is not a snapferry repository (not a directory)")
        cfg_path = path / CONFIG
        try:
            raw = cfg_path.read_bytes()
        except FileNotFoundError:
            raise RepositoryError(
                f"{path} is not a snapferry repository (no config file)"
            ) from None
        except OSError as e:
            raise io_error(f"reading {cfg_path}", e) from None
        try:
            config = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RepositoryError(
                f"{path} is not a snapferry repository (config is not JSON)"
            ) from None
        if not isinstance(config, dict) or config.get("kind") != REPO_KIND:
            raise RepositoryError(f"{path} is not a snapferry repository (unknown config)")
        fmt = config.get("format")
        if not isinstance(fmt, int):
            raise CorruptionError(f"{cfg_path}: no format number")
        if fmt > REPO_FORMAT:
            raise RepositoryError(
                f"repository {path} has format {fmt}, newer than this snapferry supports "
                f"({REPO_FORMAT}); upgrade snapferry"
            )
        try:
            cs = config["chunk_size"]
            int(config["seed"], 16)
            if not isinstance(cs, int) or cs <= 0 or cs & (cs - 1):
                raise ValueError("chunk_size")
            if not isinstance(config["zstd_level"], int):
                raise ValueError("zstd_level")
            if not isinstance(config["id"], str):
                raise ValueError("id")
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptionError(f"{cfg_path}: invalid config ({e})") from None
        return cls(path, config)

    # -- locking -------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, purpose: str = "backup") -> Iterator[None]:
        """Hold the repository's exclusive lock (one writer at a time).

        A lock left by a dead process on this host (pid gone or reused) is stale and
        taken over; a live holder makes this raise ``RepositoryError`` at once.
        """
        locks = self.path / LOCKS
        lock_path = locks / LOCK_NAME
        me = {
            "pid": os.getpid(),
            "pid_start": _pid_start_time(os.getpid()),
            "host": socket.gethostname(),
            "purpose": purpose,
            "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "token": secrets.token_hex(8),
        }
        try:
            locks.mkdir(exist_ok=True)
            with self._guard():
                self._acquire(lock_path, me)
        except OSError as e:
            raise io_error("taking the repository lock", e) from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError), self._guard():
                held = self._read_lock(lock_path)
                if held is not None and held.get("token") == me["token"]:
                    os.unlink(lock_path)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """A short flock serialising the check-and-take of the lock file."""
        fd = os.open(self.path / LOCKS / ".guard", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _read_lock(lock_path: Path) -> dict[str, Any] | None:
        try:
            d = json.loads(lock_path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}
        return d if isinstance(d, dict) else {}

    def _acquire(self, lock_path: Path, me: dict[str, Any]) -> None:
        held = self._read_lock(lock_path)
        if held is not None:
            pid = held.get("pid")
            same_host = held.get("host") == me["host"]
            if not held:
                # unreadable: a crash between create and write; stale after a grace time
                age = time.time() - lock_path.stat().st_mtime
                if age < 30:
                    raise RepositoryError(f"repository {self.path} is locked (lock being written)")
            elif not (
                same_host and isinstance(pid, int) and not _pid_alive(pid, held.get("pid_start"))
            ):
                raise RepositoryError(
                    f"repository {self.path} is locked by {held.get('purpose', 'another job')} "
                    f"(pid {pid} on {held.get('host')}, since {held.get('since')}); "
                    f"if that process is gone, remove {lock_path}"
                )
            os.unlink(lock_path)  # stale
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, json.dumps(me).encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- restore points ------------------------------------------------------------
    def new_backup_id(self) -> str:
        """Sortable unique id, e.g. ``20261125T193924Z-3f9a``."""
        now = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return f"{now}-{secrets.token_hex(2)}"

    def _manifest_paths(self) -> Iterator[Path]:
        base = self.path / BACKUPS
        try:
            vms = sorted(base.iterdir())
        except FileNotFoundError:
            return
        for vm_dir in vms:
            if not vm_dir.is_dir():
                continue
            for bdir in sorted(vm_dir.iterdir()):
                mp = bdir / MANIFEST
                if mp.is_file():
                    yield mp

    def _read_manifest(self, mp: Path) -> Manifest:
        try:
            text = mp.read_bytes()
        except OSError as e:
            raise io_error(f"reading {mp}", e) from None
        name = f"restore point {mp.parent.name}"
        m = Manifest.from_json(text, name=name)
        if m.backup_id != mp.parent.name:
            raise CorruptionError(f"{name}: manifest names another backup id {m.backup_id!r}")
        return m

    def list_backups(self, vm: str | None = None) -> list[Manifest]:
        """Committed restore points (of ``vm``, or all), oldest first, newest last."""
        out: list[Manifest] = []
        if vm is not None:
            vm_dir = self.path / BACKUPS / path_component(vm)
            paths = sorted(vm_dir.glob(f"*/{MANIFEST}")) if vm_dir.is_dir() else []
        else:
            paths = list(self._manifest_paths())
        for mp in paths:
            out.append(self._read_manifest(mp))
        out.sort(key=lambda m: (m.created, m.backup_id))
        return out

    def backup_dir(self, backup_id: str) -> Path:
        """The directory of a committed restore point (``RepositoryError`` if unknown)."""
        if not _ID_RE.fullmatch(backup_id):
            raise RepositoryError(f"no restore point {backup_id!r} in {self.path}")
        hits = [p.parent for p in (self.path / BACKUPS).glob(f"*/{backup_id}/{MANIFEST}")]
        if not hits:
            raise RepositoryError(f"no restore point {backup_id!r} in {self.path}")
        if len(hits) > 1:
            raise CorruptionError(f"restore point id {backup_id!r} appears more than once")
        return hits[0]

    def load_manifest(self, backup_id: str) -> Manifest:
        return self._read_manifest(self.backup_dir(backup_id) / MANIFEST)

    def load_index(self, backup_id: str, disk: str, manifest: Manifest | None = None) -> DiskIndex:
        m = manifest if manifest is not None else self.load_manifest(backup_id)
        try:
            entry = m.disk(disk)
        except KeyError:
            raise RepositoryError(
                f"restore point {backup_id} has no disk {disk!r} "
                f"(disks: {', '.join(m.disk_names) or 'none'})"
            ) from None
        idx = DiskIndex.load(self.backup_dir(backup_id) / entry.index_file)
        if idx.virtual_size != entry.virtual_size or idx.chunk_size != m.chunk_size:
            raise CorruptionError(
                f"restore point {backup_id}, disk {disk}: index does not match the manifest"
            )
        return idx

    def latest(self, vm: str) -> Manifest | None:
        b = self.list_backups(vm)
        return b[-1] if b else None

    def commit_restore_point(self, manifest: Manifest, indexes: dict[str, DiskIndex]) -> Path:
        """Write the indexes, sync the store, then the manifest: the commit point.

        Until ``manifest.json`` is renamed into place the restore point does not exist;
        a crash before leaves only an ignorable directory. Fills each disk entry's
        ``index_file``, ``chunks`` and ``zero_chunks`` from its index. Call it while
        holding ``lock()``. Returns the restore point's directory.
        """
        names = manifest.disk_names
        if not _ID_RE.fullmatch(manifest.backup_id):
            raise ValueError(f"invalid backup id {manifest.backup_id!r}")
        if sorted(names) != sorted(indexes):
            raise ValueError(f"manifest disks {names} != indexes {sorted(indexes)}")
        if manifest.chunk_size != self.chunk_size:
            raise ValueError("manifest chunk size differs from the repository's")
        vm_dir = self.path / BACKUPS / path_component(manifest.vm)
        bdir = vm_dir / manifest.backup_id
        if (bdir / MANIFEST).exists() or any(
            (self.path / BACKUPS).glob(f"*/{manifest.backup_id}/{MANIFEST}")
        ):
            raise RepositoryError(f"restore point {manifest.backup_id} already exists")
        for entry in manifest.disks:
            idx = indexes[entry.name]
            if idx.chunk_size != self.chunk_size or idx.virtual_size != entry.virtual_size:
                raise ValueError(f"index of disk {entry.name} does not match its entry")
        created_vm_dir = not vm_dir.exists()
        try:
            bdir.mkdir(parents=True, exist_ok=True)
            for entry in manifest.disks:
                idx = indexes[entry.name]
                entry.index_file = path_component(entry.name) + ".idx"
                entry.chunks = len(idx)
                entry.zero_chunks = idx.zero_count()
                final = bdir / entry.index_file
                tmp = bdir / f".{entry.index_file}.tmp"
                idx.save(tmp)
                os.rename(tmp, final)
            fsync_dir(bdir)
            fsync_dir(vm_dir)
            if created_vm_dir:
                fsync_dir(vm_dir.parent)
            self.store.sync_all()  # chunks of every worker process, then the commit
            _write_file_durably(bdir / MANIFEST, manifest.to_json().encode())
        except OSError as e:
            shutil.rmtree(bdir, ignore_errors=True)
            raise io_error(f"writing restore point {manifest.backup_id}", e) from None
        except RepositoryError:
            if not (bdir / MANIFEST).exists():
                shutil.rmtree(bdir, ignore_errors=True)
            raise
        return bdir
