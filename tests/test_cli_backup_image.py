"""``snapferry backup IMAGE``: a qcow2 (or any format qemu-img knows) is read as the
disk it holds, never as its container bytes; persistent qcow2 bitmaps give
incrementals; the private qemu-nbd is gone afterwards; an image a running QEMU holds
is refused with a pointer to the QMP way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-nbd") and shutil.which("qemu-io")),
    reason="needs qemu-img, qemu-nbd and qemu-io (qemu-utils)",
)
MiB = 1 << 20


def _qcow2(path: Path, size: str = "64M", writes: tuple[str, ...] = ()) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    for w in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", w, str(path)], check=True,
                       capture_output=True)
    return path


def _raw_of(image: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    return out


def _qemu_nbd_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "qemu-nbd"], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def test_qcow2_source_is_read_as_its_disk(repo: Path, tmp_path: Path) -> None:
    """Finding: a qcow2 was backed up as its container bytes (restore gave a qcow2 inside
    a raw image, or a qcow2 in a qcow2)."""
    img = _qcow2(tmp_path / "vm.qcow2", writes=("write -P 0xab 1M 3M", "write -P 0x5a 40M 1M"))
    before = _qemu_nbd_pids()
    p = run_cli("backup", img, "--repo", repo, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    (disk,) = doc["disks"]
    assert disk["virtual_size"] == 64 * MiB  # the disk's size, not the container's
    assert disk["bytes_read"] <= 8 * MiB  # allocated clusters only (4 MiB written)
    assert _qemu_nbd_pids() <= before  # the private server is gone
    out = tmp_path / "out.raw"
    r = run_cli("restore", doc["backup_id"], "--repo", repo, "--to", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == _raw_of(img, tmp_path / "ref.raw").read_bytes()
    lst = json.loads(run_cli("list", "--repo", repo, "--json").stdout)
    src = lst["backups"][0]["source"]
    assert src["kind"] == "image" and src["format"] == "qcow2"


def test_source_format_raw_reads_container_bytes_on_request(repo: Path, tmp_path: Path) -> None:
    img = _qcow2(tmp_path / "vm.qcow2", writes=("write -P 0x11 0 1M",))
    p = run_cli("backup", img, "--repo", repo, "--source-format", "raw", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["disks"][0]["virtual_size"] == img.stat().st_size


def test_qcow2_bitmap_incremental(repo: Path, tmp_path: Path) -> None:
    """A persistent qcow2 bitmap makes an image-file incremental read only what changed."""
    img = _qcow2(tmp_path / "vm.qcow2", writes=("write -P 0x22 0 8M",))
    assert run_cli("backup", img, "--repo", repo).returncode == 0
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 1M", str(img)],
                   check=True, capture_output=True)
    p = run_cli("backup", img, "--repo", repo, "--bitmap", "b0", "--audit", "0", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["mode"] == "incremental"
    assert doc["disks"][0]["bytes_read"] == 1 * MiB  # one 1 MiB chunk changed
    out = tmp_path / "out.raw"
    assert run_cli("restore", "latest", "--repo", repo, "--to", out).returncode == 0
    assert out.read_bytes() == _raw_of(img, tmp_path / "ref.raw").read_bytes()


def test_image_held_by_a_running_qemu_is_refused(
    repo: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("needs qemu-system-x86_64")
    img = _qcow2(tmp_path / "live.qcow2")
    vm = subprocess.Popen(
        [qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-drive", f"file={img},format=qcow2,if=none,id=d0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    procs.append(vm)
    deadline = time.monotonic() + 30
    while not any(os.path.realpath(f"/proc/{vm.pid}/fd/{fd}") == str(img)
                  for fd in os.listdir(f"/proc/{vm.pid}/fd")):
        assert vm.poll() is None, vm.stderr.read() if vm.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p = run_cli("backup", img, "--repo", repo)
    line = assert_one_line_error(p)
    assert "in use by a running QEMU" in line and "qemu+unix://" in line


def _servers_of(image: Path) -> list[int]:
    """qemu-nbd processes serving ``image``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-nbd") and str(image).encode() in cmd:
            out.append(int(pid))
    return out


def _stalled_backup(image: Path, repo: Path, tmp_path: Path,
                    procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    from conftest import cli_env, snapferry_exe

    stall = tmp_path / "stall.pids"
    env = cli_env(SNAPFERRY_FAULT=f"worker-stall=2@{stall}")
    p = subprocess.Popen([*snapferry_exe(), "backup", str(image), "--repo", str(repo)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    procs.append(p)
    deadline = time.monotonic() + 60
    while not (stall.exists() and stall.read_text().strip()):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "backup never reached the stall point"
        time.sleep(0.05)
    assert len(_servers_of(image)) == 1
    return p


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_image_backup_leaves_no_server(
    repo: Path, tmp_path: Path, procs: list[subprocess.Popen[str]], how: str
) -> None:
    """Ctrl-C rolls the backup back and stops the private qemu-nbd; a SIGKILLed snapferry
    takes its qemu-nbd with it (parent-death signal): no server is left serving."""
    import signal

    from conftest import manifests

    img = _qcow2(tmp_path / "big.qcow2", writes=("write -P 0x44 0 24M",))
    p = _stalled_backup(img, repo, tmp_path, procs)
    if how == "sigint":
        os.killpg(p.pid, signal.SIGINT)
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert err.strip().splitlines()[-1].startswith("snapferry: ")
    else:
        p.kill()
        p.wait(timeout=30)
        os.killpg(p.pid, signal.SIGKILL)  # the stalled workers (same process group)
    deadline = time.monotonic() + 20
    while _servers_of(img):
        assert time.monotonic() < deadline, "qemu-nbd outlived the backup"
        time.sleep(0.05)
    assert manifests(repo) == []


def test_probed_backing_chain_needs_the_users_word(repo: Path, tmp_path: Path) -> None:
    """A raw disk's guest controls its first bytes: a qcow2 header naming a host file as
    backing file must not make the backup read that file."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"host secret " * 1024)  # 12 KiB: a whole number of sectors
    img = tmp_path / "guest.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(img)], check=True)
    p = run_cli("backup", img, "--repo", repo)
    line = assert_one_line_error(p, code=2)
    assert "--source-format" in line and str(secret) in line
    p = run_cli("backup", img, "--repo", repo, "--source-format", "qcow2", "--json")
    assert p.returncode == 0, p.stderr  # the user said so: the chain is read
    assert json.loads(p.stdout)["disks"][0]["virtual_size"] == secret.stat().st_size
