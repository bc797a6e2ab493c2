"""``ImageSource``: a disk image in a format QEMU knows (qcow2, vmdk, vdi, vhdx, ...)
read as the disk it holds, never as its container bytes.

``probe_format`` asks ``qemu-img info --output=json`` what a file is. A non-raw image is
served read-only by a private ``qemu-nbd -r --persistent`` on a unix socket in a fresh
temporary directory, and read with the ordinary ``NbdSource`` (its allocation map
comes from the image's own metadata: unallocated qcow2 clusters are holes). Reader
workers connect to the same socket. ``close()`` stops the server and removes the
directory; the server also gets SIGTERM should snapferry die first.

``--bitmap NAME`` on a qcow2 source exports that persistent dirty bitmap
(``qemu-nbd -B NAME``): an incremental backup of an image file.

A file whose header QEMU recognises is never read raw when qemu-img is missing: the
header is checked here too, and the user is told to install qemu-utils.

A probed format is a guess from the file's first bytes, which the guest of a raw disk
controls: an image that probes as having a backing file (a chain of other files, any
host file a crafted header names) is refused unless the format was given
(``--source-format``). The summary and the manifest say which format was read.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snapferry.engine.errors import SourceError, UsageError
from snapferry.engine.source import DiskSource, Extent
from snapferry.engine.sources.nbd import NbdSource, NbdSpec

START_TIMEOUT = 20.0  # seconds for qemu-nbd to open the image and listen
_MAGICS = {b"QFI\xfb": "qcow2", b"KDMV": "vmdk", b"conectix": "vpc", b"vhdxfile": "vhdx"}
_PR_SET_PDEATHSIG = 1


def _header_format(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    for magic, fmt in _MAGICS.items():
        if head.startswith(magic):
            return fmt
    return None


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "failed"


def _lock_failure(stderr: str) -> bool:
    """qemu-img's words for an image whose lock a running QEMU holds."""
    text = stderr.lower()
    return "lock" in text or "another process using the image" in text


def probe_format(path: str) -> dict[str, Any]:
    """``qemu-img info`` of ``path`` as a dict (``format``, ``virtual-size``, ...).

    ``{"format": "raw"}`` when qemu-img is not installed and the header is not one QEMU
    knows; ``SourceError`` when it is (a qcow2 must not be read as raw bytes) or when a
    running QEMU holds the image (a live VM is backed up through its QMP socket)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        fmt = _header_format(path)
        if fmt is not None:
            raise SourceError(
                f"{path} is a {fmt} image: reading it needs qemu-img and qemu-nbd "
                "(install qemu-utils)"
            )
        return {"format": "raw"}
    try:
        r = subprocess.run(
            [qemu_img, "info", "--output=json", path],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceError(f"qemu-img info {path} failed: {e}") from None
    if r.returncode != 0:
        msg = _one_line(r.stderr)
        if _lock_failure(r.stderr):
            raise SourceError(
                f"{path} is in use by a running QEMU (its image lock is held): back up the "
                "running VM through its QMP socket (qemu+unix:///QMP?agent=QGA) instead"
            )
        raise SourceError(f"cannot read the image {path}: {msg}")
    try:
        info = json.loads(r.stdout)
    except ValueError:
        raise SourceError(f"qemu-img info {path}: unreadable output") from None
    if not isinstance(info, dict) or not isinstance(info.get("format"), str):
        raise SourceError(f"qemu-img info {path}: no format in its output")
    return info


def _die_with_parent() -> None:
    """In the qemu-nbd child: SIGTERM when snapferry (its parent) dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ImageSource:
    """A non-raw image served by a private read-only ``qemu-nbd``, read over NBD."""

    kind = "image"

    def __init__(self, path: str, fmt: str, *, bitmap: str | None = None) -> None:
        qemu_nbd = shutil.which("qemu-nbd")
        if qemu_nbd is None:
            raise SourceError(f"{path} is a {fmt} image: reading it needs qemu-nbd "
                              "(install qemu-utils)")
        self.path = os.path.abspath(path)
        self.format = fmt
        self._dir = Path(tempfile.mkdtemp(prefix="snapferry-image-"))
        self._socket = self._dir / "nbd.sock"
        cmd = [
            qemu_nbd, "--read-only", "--persistent", "--shared=0",
            f"--format={fmt}", f"--socket={self._socket}",
        ]
        if bitmap is not None:
            cmd.append(f"--bitmap={bitmap}")
        cmd.append(self.path)
        self._proc: subprocess.Popen[bytes] | None = None
        self._nbd: NbdSource | None = None
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C is ours to handle, not qemu-nbd's
                preexec_fn=_die_with_parent,
            )
            self._wait_listening()
            self._nbd = NbdSource.open(self.uri, bitmap=bitmap)
        except BaseException:
            self.close()
            raise

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self._socket}"

    def _wait_listening(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not self._socket.exists():
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise SourceError(f"qemu-nbd could not serve {self.path}: {_one_line(err)}")
            if time.monotonic() > deadline:
                raise SourceError(f"qemu-nbd did not start serving {self.path} in time")
            time.sleep(0.02)

    def _src(self) -> NbdSource:
        if self._nbd is None:
            raise SourceError(f"image source {self.path} is closed")
        return self._nbd

    # -- DiskSource ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._src().size

    @property
    def max_connections(self) -> int:
        return self._src().max_connections

    def release(self) -> None:
        self._src().release()

    def spare_connections(self, want: int) -> int:
        return self._src().spare_connections(want)

    def extents(
        self, offset: int = 0, length: int | None = None, *, dirty: bool = False
    ) -> Iterator[Extent]:
        return self._src().extents(offset, length, dirty=dirty)

    def readinto(self, buf: memoryview, offset: int) -> None:
        self._src().readinto(buf, offset)

    def spec(self) -> NbdSpec:
        return self._src().spec()

    def clone(self) -> DiskSource:
        return self._src().clone()

    def describe(self) -> dict[str, Any]:
        d = self._src().describe()
        return {
            "kind": "image",
            "path": self.path,
            "format": self.format,
            "size": d["size"],
            "bitmap": d.get("bitmap"),
        }

    def close(self) -> None:
        nbd, self._nbd = self._nbd, None
        if nbd is not None:
            with contextlib.suppress(Exception):
                nbd.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(path: str, *, bitmap: str | None = None, fmt: str | None = None) -> DiskSource:
    """A local path as a ``DiskSource``: raw files and block devices are read directly
    (``FileSource``); any other format QEMU knows through ``ImageSource``. ``fmt``
    overrides the probe (``raw`` reads the bytes as they are)."""
    from snapferry.engine.sources.file import FileSource

    if not os.path.exists(path):
        return FileSource(path)  # its own clear "does not exist" error
    if os.path.isdir(path):
        return FileSource(path)
    if fmt is None:
        info = probe_format(path)
        fmt = str(info["format"])
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if fmt != "raw" and backing:
            # A probed format is only a guess: a raw guest disk can start with a qcow2
            # header the guest wrote, naming any host file as its backing file. Reading
            # a chain of files needs the user's word for it.
            raise UsageError(
                f"{path} looks like a {fmt} image on top of {backing}: the backup would "
                f"read that chain; give --source-format {fmt} to back it up so, or "
                "--source-format raw to read the file's bytes as they are"
            )
    if fmt == "raw":
        if bitmap is not None:
            raise UsageError(
                "--bitmap needs an NBD source or a qcow2 image (a raw file has no dirty bitmap)"
            )
        return FileSource(path)
    if bitmap is not None and fmt != "qcow2":
        raise UsageError(f"--bitmap needs a qcow2 image; {path} is {fmt}")
    return ImageSource(path, fmt, bitmap=bitmap)
