"""File-level restore: list and copy files out of an ext2/3/4 restore point.

No byte of the disk is written anywhere. The disk is served by the same nbdkit export
as ``snapferry serve`` on a private socket; ``nbdfuse`` (libnbd) shows that export as
one read-only file in a private FUSE directory; ``debugfs`` (e2fsprogs) reads the
filesystem from that file in user space and only touches the blocks it needs::

    repository --RestorePointSource--> nbdkit (private socket)
        --NBD--> nbdfuse (FUSE file <tmp>/mnt/nbd) --read()--> debugfs -c -R "ls|dump|rdump"

Why this way: the kernel here has no ``nbd`` module, so the export cannot become a
block device; mounting ext4 in the kernel needs root and a loop device, and a mount
replays the journal (a write). ``fuse2fs`` would add a second FUSE layer for nothing
that ``debugfs`` cannot do from a file; libguestfs boots an appliance VM (seconds, and
a large dependency). ``debugfs`` opens the image read-only (``-c``: no bitmaps read)
and FUSE works without root through the setuid ``fusermount3``. Limit: ``debugfs``
does not replay the journal, so a restore point taken without a guest freeze can miss
the last transactions; frozen (quiesced) backups have a clean journal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapferry.engine.errors import SnapferryError, UsageError
from snapferry.engine.serve.server import ExportOptions, NbdkitExport

MOUNT_TIMEOUT = 30.0


class FilesError(SnapferryError):
    """The restore point's filesystem could not be read."""


def _tool(name: str, package: str) -> str:
    for cand in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise UsageError(f"{name} is not installed (apt-get install {package})")


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    inode: int
    mode: int
    uid: int
    gid: int
    size: int | None

    @property
    def kind(self) -> str:
        m = self.mode
        if stat.S_ISDIR(m):
            return "dir"
        if stat.S_ISREG(m):
            return "file"
        if stat.S_ISLNK(m):
            return "symlink"
        return "other"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "mode": f"{stat.S_IMODE(self.mode):04o}",
                "uid": self.uid, "gid": self.gid, "size": self.size, "inode": self.inode}


def parse_ls_p(text: str) -> list[FileEntry]:
    """``debugfs ls -p`` lines: ``/inode/mode/uid/gid/name/size/`` (size empty for
    directories). A name may hold ``/``-free bytes only, so splitting is safe."""
    out: list[FileEntry] = []
    for line in text.splitlines():
        if not line.startswith("/"):
            continue
        parts = line.split("/")
        if len(parts) < 8:
            continue
        _, ino, mode, uid, gid = parts[:5]
        size = parts[-2]
        name = "/".join(parts[5:-2])
        if name in (".", "..") or not ino.isdigit() or ino == "0":
            continue
        out.append(FileEntry(name, int(ino), int(mode, 8), int(uid), int(gid),
                             int(size) if size.isdigit() else None))
    return out


def _check_guest_path(path: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"guest path {path!r} must be absolute (start with /)")
    if any(c in path for c in "\n\"") or "\0" in path:
        raise UsageError(f"guest path {path!r} holds a character debugfs cannot take")
    return path


class RestorePointFiles:
    """A restore point's ext filesystem opened for reading (a context manager)."""

    def __init__(self, repo: Path | str, backup_id: str, disk: str | None = None, *,
                 password_file: str | None = None) -> None:
        self._debugfs = _tool("debugfs", "e2fsprogs")
        self._nbdfuse = _tool("nbdfuse", "libnbd-bin")
        self._fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
        self._dir = Path(tempfile.mkdtemp(prefix="sf-files-"))
        os.chmod(self._dir, 0o700)
        self._mnt = self._dir / "mnt"
        self._mnt.mkdir()
        self.image = self._mnt / "nbd"
        self._fuse: subprocess.Popen[bytes] | None = None
        try:
            self.export = NbdkitExport(ExportOptions(repo=repo, backup_id=backup_id, disk=disk,
                                                     socket=self._dir / "nbd.sock",
                                                     password_file=password_file))
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    def __enter__(self) -> RestorePointFiles:
        try:
            self.export.start()
            self._fuse = subprocess.Popen(
                [self._nbdfuse, "-r", str(self._mnt), self.export.uri],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True,
            )
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while not self._mounted():
                if self._fuse.poll() is not None:
                    err = (self._fuse.stderr.read() if self._fuse.stderr else b"").decode()
                    raise FilesError(
                        f"nbdfuse failed: {(err.strip().splitlines() or ['no message'])[-1]}"
                        " (FUSE needs /dev/fuse and fusermount3: apt-get install fuse3)"
                    )
                if time.monotonic() > deadline:
                    raise FilesError("nbdfuse did not show the export in time")
                time.sleep(0.05)
            self._check_fs()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _mounted(self) -> bool:
        try:
            return self.image.stat().st_size == self.export.size
        except OSError:
            return False

    def close(self) -> None:
        if self._fuse is not None:
            if self._fusermount and self._mounted():
                subprocess.run([self._fusermount, "-u", str(self._mnt)], capture_output=True)
            if self._fuse.poll() is None:
                self._fuse.terminate()
            try:
                self._fuse.wait(10)
            except subprocess.TimeoutExpired:
                self._fuse.kill()
                self._fuse.wait(5)
            if self._fuse.stderr:
                self._fuse.stderr.close()
            self._fuse = None
        self.export.stop()
        with contextlib.suppress(OSError):
            os.rmdir(self._mnt)  # never rmtree: it could still be a mount point
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- debugfs ----------------------------------------------------------------------
    def _debugfs_run(self, request: str) -> tuple[str, str]:
        r = subprocess.run([self._debugfs, "-c", "-R", request, str(self.image)],
                           capture_output=True)
        out = r.stdout.decode(errors="surrogateescape")
        err = "\n".join(
            ln for ln in r.stderr.decode(errors="replace").splitlines()
            if ln.strip() and not ln.startswith("debugfs ")
            and "catastrophic mode" not in ln
        )
        if r.returncode != 0:
            raise FilesError(f"debugfs failed: {err or r.returncode}")
        return out, err

    def _check_fs(self) -> None:
        _, err = self._debugfs_run("stats -h")
        if err:
            raise FilesError(
                f"disk {self.export.disk} of {self.export.opts.backup_id} holds no ext2/3/4 "
                f"filesystem debugfs can read ({err.splitlines()[0].split(' while trying')[0]})"
            )

    def stat(self, path: str) -> FileEntry:
        path = _check_guest_path(path)
        if path.rstrip("/") == "":
            return FileEntry("/", 2, stat.S_IFDIR | 0o755, 0, 0, None)
        parent, _, name = path.rstrip("/").rpartition("/")
        for e in self.ls(parent or "/"):
            if e.name == name:
                return e
        raise UsageError(f"{path}: no such file or directory in the restore point")

    def ls(self, path: str) -> list[FileEntry]:
        path = _check_guest_path(path)
        out, err = self._debugfs_run(f'ls -p "{path}"')
        if err:
            if "not a directory" in err.lower():
                return [self.stat(path)]
            if "not found" in err.lower():
                raise UsageError(f"{path}: no such file or directory in the restore point")
            raise FilesError(f"{path}: {err.splitlines()[0]}")
        entries = parse_ls_p(out)
        if not out.strip() and not entries:
            raise UsageError(f"{path}: no such file or directory in the restore point")
        return entries

    def get(self, path: str, dest: Path) -> Path:
        """Copy ``path`` (file, symlink or directory tree) out to ``dest``.

        A file goes to ``dest`` (or ``dest/<name>`` when ``dest`` is a directory); a
        directory goes to ``dest/<name>`` (``dest`` is created if missing). Never
        overwrites: an existing target is refused."""
        entry = self.stat(path)
        name = path.rstrip("/").rpartition("/")[2] or "root"
        dest = Path(dest)
        if entry.kind == "dir":
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / name
            if target.exists() or target.is_symlink():
                raise UsageError(f"{target} exists; not overwriting it")
            _, err = self._debugfs_run(f'rdump "{path}" "{dest.resolve()}"')
        else:
            target = dest / name if dest.is_dir() else dest
            if target.exists() or target.is_symlink():
                raise UsageError(f"{target} exists; not overwriting it")
            if not target.parent.is_dir():
                raise UsageError(f"directory {target.parent} does not exist")
            if entry.kind == "symlink":
                _, err = self._debugfs_run(f'rdump "{path}" "{target.parent.resolve()}"')
                if target.name != name:
                    os.rename(target.parent / name, target)
            else:
                _, err = self._debugfs_run(f'dump -p "{path}" "{target.resolve()}"')
        problems = [ln for ln in err.splitlines() if "Operation not permitted" not in ln]
        if problems or not (target.exists() or target.is_symlink()):
            raise FilesError(f"copying {path} failed: {(problems or ['nothing written'])[0]}")
        return target
