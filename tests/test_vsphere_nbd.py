"""transport=nbd: the disks are read from NBD exports the user serves in front of the
snapshot (nbdkit's vddk plugin in production). Here a real nbdkit serves a local image
with its file plugin, standing in for the vddk plugin (which needs the proprietary
VDDK); the vSphere side is vCSim, driven by the real coordinator."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from vcsimserver import VM0, Vcsim, observe_vm

from snapferry.engine.coordinator import VmBackupOptions, backup_vm
from snapferry.engine.errors import HypervisorError
from snapferry.engine.restore import restore
from snapferry.engine.store.repo import Repository
from snapferry.engine.vsphere.backend import VsphereHypervisor, VsphereOptions

pytest_plugins = ["vcsimserver"]

KiB = 1024


@contextmanager
def nbdkit_file(image: Path, sock: Path) -> Iterator[None]:
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed (Debian package nbdkit)")
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-r", "-U", str(sock), "file", f"file={image}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        if not sock.exists():
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"nbdkit did not start: {err}")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def make(path: Path, size: int) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(128 * KiB)
        f.write(bytes(range(256)) * 256)
    return path.read_bytes()


def backend(sim: Vcsim, tmp_path: Path) -> VsphereHypervisor:
    opts = VsphereOptions(nbd_uri=f"nbd+unix:///?socket={tmp_path}/{{disk}}.sock")
    return VsphereHypervisor.from_uri(
        sim.uri(VM0, transport="nbd"), password=sim.password, options=opts
    )


def test_backup_over_nbd_and_restore(vcsim: Vcsim, tmp_path: Path) -> None:
    data = make(tmp_path / "disk.img", 1 << 20)  # the simulator disk's capacity
    repo = Repository.init(tmp_path / "repo", chunk_size=64 * KiB, zstd_level=3)
    hv = backend(vcsim, tmp_path)
    try:
        with nbdkit_file(tmp_path / "disk.img", tmp_path / "scsi0-0.sock"):
            res = backup_vm(hv, repo, VmBackupOptions(quiesce="required", workers=1))
    finally:
        hv.close()
    assert res.backup.mode == "full" and res.consistency == "filesystem"
    assert observe_vm(vcsim)["snapshots"] == []
    restore(repo, res.backup.backup_id, to=tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == data


def test_export_of_the_wrong_size_is_refused(vcsim: Vcsim, tmp_path: Path) -> None:
    make(tmp_path / "disk.img", 512 * KiB)
    repo = Repository.init(tmp_path / "repo", chunk_size=64 * KiB, zstd_level=3)
    hv = backend(vcsim, tmp_path)
    try:
        with (
            nbdkit_file(tmp_path / "disk.img", tmp_path / "scsi0-0.sock"),
            pytest.raises(HypervisorError, match="serves 524288 bytes but the disk has 1048576"),
        ):
            backup_vm(hv, repo, VmBackupOptions(workers=1))
    finally:
        hv.close()
    assert observe_vm(vcsim)["snapshots"] == []
    assert repo.list_backups() == []
