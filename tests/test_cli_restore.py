"""``snapferry restore``: the format from the target's name, ``latest``/``latest:NAME``/
unique id prefixes, block devices as targets, and no restore over an image that a
running process holds open (unless ``--force-in-use``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

from snapferry.engine.restore_target import infer_format, qemu_lock_held

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def _backup(repo: Path, image: Path, name: str | None = None) -> str:
    args = ["backup", image, "--repo", repo, "--json"] + (["--name", name] if name else [])
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    return str(json.loads(p.stdout)["backup_id"])


def _format_of(path: Path) -> str:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return str(json.loads(out)["format"])


@needs_qemu_img
def test_format_follows_the_target_name(repo: Path, mixed_image: Path, tmp_path: Path) -> None:
    """Finding: ``restore ID --to x.qcow2`` without ``--format`` wrote raw bytes."""
    bid = _backup(repo, mixed_image)
    q = tmp_path / "x.qcow2"
    p = run_cli("restore", bid, "--repo", repo, "--to", q, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["format"] == "qcow2" and _format_of(q) == "qcow2"
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(q),
                    str(mixed_image)], check=True, capture_output=True)
    img = tmp_path / "x.img"
    assert run_cli("restore", bid, "--repo", repo, "--to", img).returncode == 0
    assert img.read_bytes() == mixed_image.read_bytes()
    forced = tmp_path / "y.qcow2"
    assert run_cli("restore", bid, "--repo", repo, "--to", forced, "--format", "raw"
                   ).returncode == 0
    assert forced.read_bytes() == mixed_image.read_bytes()  # an explicit --format wins


def test_infer_format_table(tmp_path: Path) -> None:
    assert infer_format(tmp_path / "a.QCOW2", None) == "qcow2"
    assert infer_format(tmp_path / "a.raw", None) == "raw"
    assert infer_format(tmp_path / "a.img", None) == "raw"
    assert infer_format(tmp_path / "a", None) == "raw"
    assert infer_format(tmp_path / "a.raw", "qcow2") == "qcow2"


def test_latest_and_prefixes(repo: Path, mixed_image: Path, tmp_path: Path) -> None:
    """Finding: ``restore latest`` and id prefixes were not accepted."""
    a1 = _backup(repo, mixed_image, "vm-a")
    b1 = _backup(repo, mixed_image, "vm-b")
    out = tmp_path / "o.raw"
    p = run_cli("restore", "latest", "--repo", repo, "--to", out)
    line = assert_one_line_error(p, code=2)  # two series: which one is meant?
    assert "ambiguous" in line and "latest:NAME" in line
    p = run_cli("restore", "latest:vm-a", "--repo", repo, "--to", out, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["backup_id"] == a1
    out.unlink()
    p = run_cli("restore", b1[:-2], "--repo", repo, "--to", out, "--json")
    if a1[:-2] == b1[:-2]:  # same second and same first random hex digits: ambiguous
        assert "ambiguous" in assert_one_line_error(p, code=2)
    else:
        assert p.returncode == 0 and json.loads(p.stdout)["backup_id"] == b1
    p = run_cli("restore", "2", "--repo", repo, "--to", tmp_path / "p.raw")
    assert "ambiguous" in assert_one_line_error(p, code=2)
    p = run_cli("restore", "latest:nope", "--repo", repo, "--to", tmp_path / "q.raw")
    assert "vm-a, vm-b" in assert_one_line_error(p, code=1)
    p = run_cli("verify", "latest:vm-b", "--repo", repo, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["backups_checked"] == [b1]


@contextlib.contextmanager
def _loop_device(backing: Path) -> Iterator[Path]:
    p = subprocess.run(["losetup", "--find", "--show", str(backing)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {p.stderr.strip()}")
    dev = Path(p.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", str(dev)], check=False)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None,
                    reason="needs root and losetup for a loop device")
def test_block_device_target(repo: Path, mixed_image: Path, tmp_path: Path) -> None:
    """Finding: block devices could be sources but not restore targets. The device's old
    bytes (random here) must be replaced, zeros included; bytes past the disk stay."""
    bid = _backup(repo, mixed_image)
    size = mixed_image.stat().st_size
    backing = tmp_path / "dev.img"
    tail = os.urandom(1 << 20)
    backing.write_bytes(os.urandom(size) + tail)
    with _loop_device(backing) as dev:
        p = run_cli("restore", bid, "--repo", repo, "--to", dev)
        assert "--force" in assert_one_line_error(p, code=2)
        p = run_cli("restore", bid, "--repo", repo, "--to", dev, "--format", "qcow2",
                    "--force")
        assert "raw only" in assert_one_line_error(p, code=2)
        p = run_cli("restore", bid, "--repo", repo, "--to", dev, "--force", "--json")
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["format"] == "raw" and doc["disk"]["virtual_size"] == size
        assert doc["direct_io"] is True, "a block device is written with O_DIRECT"
        with open(dev, "rb") as f:
            got = f.read(size + len(tail))
    assert got[:size] == mixed_image.read_bytes()
    assert got[size:] == tail


def _wait_open(pid: int, path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            if any(os.path.realpath(f"/proc/{pid}/fd/{fd}") == str(path)
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the holder never opened the file"
        time.sleep(0.05)


@needs_qemu_img
def test_restore_over_a_running_vms_image_is_refused(
    repo: Path, mixed_image: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Finding: ``restore --force`` onto the image of a running VM succeeded and QEMU went
    on writing to the deleted file."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("needs qemu-system-x86_64")
    bid = _backup(repo, mixed_image)
    live = tmp_path / "live.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(live), "64M"], check=True)
    before = live.read_bytes()
    vm = subprocess.Popen(
        [qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-drive", f"file={live},format=qcow2,if=none,id=d0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    procs.append(vm)
    _wait_open(vm.pid, live, vm)
    assert qemu_lock_held(live)
    p = run_cli("restore", bid, "--repo", repo, "--to", live, "--force")
    line = assert_one_line_error(p, code=2)
    assert "in use by" in line and "--force-in-use" in line and str(vm.pid) in line
    assert live.read_bytes() == before  # untouched
    p = run_cli("restore", bid, "--repo", repo, "--to", live, "--force", "--force-in-use")
    assert p.returncode == 0, p.stderr


def test_restore_over_a_file_another_process_holds_is_refused(
    repo: Path, mixed_image: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """The /proc/*/fd probe alone (no QEMU lock): any process with the file open."""
    bid = _backup(repo, mixed_image)
    target = tmp_path / "held.raw"
    target.write_bytes(b"old")
    holder = subprocess.Popen(
        ["python3", "-c", "import sys, time; f = open(sys.argv[1], 'rb'); time.sleep(60)",
         str(target)], stderr=subprocess.PIPE, text=True,
    )
    procs.append(holder)
    _wait_open(holder.pid, target, holder)
    p = run_cli("restore", bid, "--repo", repo, "--to", target, "--force")
    assert f"pid {holder.pid} (python3)" in assert_one_line_error(p, code=2)
    assert target.read_bytes() == b"old"
    holder.kill()
    holder.wait()
    p = run_cli("restore", bid, "--repo", repo, "--to", target, "--force")
    assert p.returncode == 0, p.stderr
