"""The CLI loads only what the command it runs uses: `snapferry --help` loads no store
(numpy, zstd, crypto) and no hypervisor or object-store client, a backup of a plain
file loads neither boto3 nor libvirt nor pyVmomi, and a small incremental of an NBD
export with its CBT audit loads none of what cost its start-up time and it does not
use: importlib.metadata (``--version`` only), numpy.ma (``np.unique``), the S3 backend
(checked in a fresh interpreter, against a real qemu-nbd and qcow2 bitmap)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from nbdservers import NbdServers, qemu_io, requires

from snapferry.native import libnbd

CLIENTS = ("boto3", "botocore", "libvirt", "pyVmomi")
NOT_ON_THE_BACKUP_PATH = ("importlib.metadata", "email", "numpy.ma",
                          "snapferry.engine.store.backends.s3")
STORE = ("numpy", "zstandard", "cryptography")

# at exit: the CLI ends the process itself (no interpreter teardown), after the atexit
# handlers
PROBE = """
import atexit, runpy, sys
sys.argv = ["snapferry", *sys.argv[1:]]
atexit.register(lambda: print("LOADED", " ".join(sorted(sys.modules)),
                                     file=sys.stderr))
runpy.run_module("snapferry", run_name="__main__")
"""


def loaded(*args: str | Path) -> set[str]:
    """Every module (dotted names too) the command had loaded when it exited."""
    p = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                       text=True, env=cli_env())
    assert p.returncode == 0, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("LOADED ")]
    return set(line.split()[1:])


def test_help_loads_no_store_and_no_clients() -> None:
    for args in (["--help"], ["backup", "--help"], ["init", "--help"]):
        mods = loaded(*args)
        assert "snapferry" in mods
        assert not mods & {*CLIENTS, *STORE}, (args, mods & {*CLIENTS, *STORE})


def test_plain_file_backup_loads_no_hypervisor_or_s3_client(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert run_cli("init", repo).returncode == 0
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x5a" * (1 << 20))
    mods = loaded("backup", disk, "--repo", repo, "--quiet")
    assert "numpy" in mods  # the probe does see what a backup loads
    assert not mods & set(CLIENTS), mods & set(CLIENTS)


@pytest.mark.skipif(not libnbd.available(), reason="libnbd.so.0 not installed")
@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_small_nbd_incremental_loads_only_what_it_uses(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert run_cli("init", repo).returncode == 0
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    qemu_io(img, "qcow2", ["write -P 0x11 0 8M"])
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    with NbdServers(tmp_path) as servers:
        srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
        args = ("backup", srv.uri, "--repo", repo, "--name", "d", "--bitmap", "b0", "--quiet")
        full = loaded(*args)
        srv.stop()
        qemu_io(img, "qcow2", ["write -P 0x22 1M 64k"])
        srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
        inc = loaded(*args, "--audit", "50")
    assert "numpy" in inc and "snapferry.engine.inline_reader" in inc  # in process
    for mods in (full, inc):
        assert not mods & {*CLIENTS, *NOT_ON_THE_BACKUP_PATH}, (
            mods & {*CLIENTS, *NOT_ON_THE_BACKUP_PATH})
