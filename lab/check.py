"""Host-side checks of lab disk images (no mount needed): for the demo and the tests.

``e2fsprogs`` reads an ext4 image straight from a file: ``debugfs -R 'cat PATH'`` gives
a file's bytes, ``e2fsck -fn`` tells whether the filesystem is clean. Images that are
not raw (qcow2) or live behind NBD are first copied to a raw file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from snapferry.engine.errors import SnapferryError


class LabCheckError(SnapferryError):
    """A host-side image check could not run."""


def _need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists()
                                  else None)
    if path is None:
        raise LabCheckError(f"{tool} not found (install e2fsprogs / qemu-utils / libnbd-bin)")
    return path


def nbd_to_raw(uri: str, dest: Path | str) -> Path:
    """Copy a whole NBD export (``nbd+unix:///NAME?socket=PATH``) to a raw file."""
    dest = Path(dest)
    r = subprocess.run([_need("nbdcopy"), uri, str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabCheckError(f"nbdcopy {uri}: {r.stderr.strip()}")
    return dest


def image_to_raw(image: Path | str, dest: Path | str) -> Path:
    """Convert any image QEMU reads (qcow2, raw, ...) to a raw file."""
    dest = Path(dest)
    r = subprocess.run([_need("qemu-img"), "convert", "-U", "-O", "raw", str(image), str(dest)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise LabCheckError(f"qemu-img convert {image}: {r.stderr.strip()}")
    return dest


def read_file(raw_image: Path | str, path: str) -> bytes:
    """Bytes of ``path`` inside the ext4 filesystem of ``raw_image``."""
    r = subprocess.run([_need("debugfs"), "-R", f"cat {path}", str(raw_image)],
                       capture_output=True)
    err = r.stderr.decode(errors="replace")
    if r.returncode != 0 or "File not found" in err:
        raise LabCheckError(f"{path} not readable in {raw_image}: {err.strip()}")
    return r.stdout


def list_dir(raw_image: Path | str, path: str = "/") -> list[str]:
    r = subprocess.run([_need("debugfs"), "-R", f"ls -p {path}", str(raw_image)],
                       capture_output=True, text=True)
    names = []
    for line in r.stdout.splitlines():
        parts = line.strip("/").split("/")
        if len(parts) >= 5 and parts[4] not in (".", ".."):
            names.append(parts[4])
    return names


def fsck_clean(raw_image: Path | str) -> tuple[bool, str]:
    """``e2fsck -fn``: (clean?, its output). Exit status 0 means no problem found."""
    r = subprocess.run([_need("e2fsck"), "-fn", str(raw_image)], capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr).strip()
