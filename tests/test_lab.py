"""The lab VM (real QEMU guest under TCG, real qemu-ga) and the host-side image checks."""

from __future__ import annotations

import gzip
import os
import subprocess
import time
from pathlib import Path

import pytest
from labvm import lab_missing, lab_vm

from snapferry.lab import check as labcheck
from snapferry.lab.initramfs import MODULES, build_initramfs
from snapferry.lab.vm import LabError, LabVm, lab_read, lab_status, lab_up, lab_write

__all__ = ["lab_vm"]  # the session fixture, imported for pytest


def _need_lab() -> None:
    why = lab_missing()
    if why:
        pytest.skip(f"lab VM unavailable: {why}")


def test_initramfs_cached_and_complete(tmp_path: Path) -> None:
    _need_lab()
    kernel, first = build_initramfs(tmp_path / "build")
    mtime = first.stat().st_mtime_ns
    kernel2, second = build_initramfs(tmp_path / "build")
    assert second == first and second.stat().st_mtime_ns == mtime  # not rebuilt
    assert kernel.version in first.name and kernel2 == kernel

    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], cwd=root,
                   input=gzip.decompress(first.read_bytes()), check=True)
    assert os.access(root / "init", os.X_OK)
    assert os.readlink(root / "bin" / "sh") == "busybox"
    assert (root / "bin" / "busybox").stat().st_size > 100_000
    for m in MODULES:
        assert (root / "lib" / "modules" / f"{m}.ko").read_bytes()[:4] == b"\x7fELF", m
    assert (root / "usr" / "sbin" / "qemu-ga").read_bytes()[:4] == b"\x7fELF"
    assert (root / "lib64" / "ld-linux-x86-64.so.2").is_symlink()
    hook = (root / "etc" / "qemu" / "fsfreeze-hook").read_text()
    assert "exit 1" in hook and os.access(root / "etc" / "qemu" / "fsfreeze-hook", os.X_OK)
    assert os.readlink(root / "var" / "run") == "/run"


def test_lab_status_write_read(lab_vm: LabVm) -> None:
    st = lab_status(lab_vm.lab_dir)
    assert st["running"] is True and st["status"] == "running"
    assert st["agent"] == "ok" and st["fsfreeze"] == "thawed"
    assert st["uri"] == f"qemu+unix://{lab_vm.qmp_socket}?agent={lab_vm.agent_socket}"
    assert lab_vm.uri.startswith("qemu+unix:///")

    data = bytes(range(256)) * 300  # several agent write calls
    lab_write("/data1/blob.bin", data, lab_vm.lab_dir)
    assert lab_read("/data1/blob.bin", lab_vm.lab_dir) == data

    # The workload keeps appending to /data0/workload.log.
    first = lab_read("/data0/workload.log", lab_vm.lab_dir)
    deadline = time.monotonic() + 30
    later = first
    while len(later) <= len(first) and time.monotonic() < deadline:
        time.sleep(0.3)
        later = lab_read("/data0/workload.log", lab_vm.lab_dir)
    assert len(later) > len(first) and later.startswith(b"seq 1\n")


def test_lab_up_is_idempotent(lab_vm: LabVm) -> None:
    again = lab_up(lab_vm.lab_dir)
    assert again.pid == lab_vm.pid
    assert again.disks == lab_vm.disks and len(again.disks) == 2


def test_lab_not_running(tmp_path: Path) -> None:
    st = lab_status(tmp_path / "nolab")
    assert st["running"] is False and st["pid"] is None
    with pytest.raises(LabError, match="not running"):
        lab_write("/data0/x", b"x", tmp_path / "nolab")


def test_labcheck_reads_and_judges_a_host_image(tmp_path: Path) -> None:
    _need_lab()
    img = tmp_path / "fs.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "8M"], check=True)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(img)], check=True)
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello from the host\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {src} hello.txt", str(img)], check=True,
                   capture_output=True)
    assert labcheck.read_file(img, "/hello.txt") == b"hello from the host\n"
    assert "hello.txt" in labcheck.list_dir(img, "/")
    ok, out = labcheck.fsck_clean(img)
    assert ok, out
    with pytest.raises(labcheck.LabCheckError):
        labcheck.read_file(img, "/missing.txt")
    qcow = tmp_path / "fs.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(img), str(qcow)], check=True)
    back = labcheck.image_to_raw(qcow, tmp_path / "back.raw")
    assert labcheck.read_file(back, "/hello.txt") == b"hello from the host\n"

    subprocess.run(["debugfs", "-w", "-R", "clri hello.txt", str(img)], check=True,
                   capture_output=True)  # damage: the directory entry points at nothing
    ok, out = labcheck.fsck_clean(img)
    assert not ok and out
