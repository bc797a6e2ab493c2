"""`snapferry backup vsphere://...` as a user runs it: a real CLI process talking to
vCSim (pyvmomi over loopback) and reading the disk through the real VDDK binding loaded
on the project's stand-in libvixDiskLib (tests/vddk_stub). The snapshot's disk is a
local sparse file served by the stand-in. No fakes: vCSim answers
QueryChangedDiskAreas with MethodNotFound, so the second backup is full, with the
reason said (the incremental path is covered in test_vsphere_e2e.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vcsimserver import VM0, Vcsim, observe_vm

if TYPE_CHECKING:
    from vddkstub import StubEnv

pytest_plugins = ["vcsimserver", "vddkstub"]

KiB = 1024
DISK_REL = "LocalDS_0/DC0_H0_VM0/disk1.vmdk"
SNAPFERRY = str(Path(sys.executable).parent / "snapferry")


def _run(args: list[str], password: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SNAPFERRY_VSPHERE_PASSWORD", None)
    if password is not None:
        env["SNAPFERRY_VSPHERE_PASSWORD"] = password
    return subprocess.run([SNAPFERRY, *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)


def test_cli_vsphere_backup_and_restore(
    vcsim: Vcsim, vddk_libdir: Path, vddk_stub_env: StubEnv, tmp_path: Path
) -> None:
    os.environ["VDDK_STUB_PASSWORD"] = vcsim.password
    try:
        size = 1 << 20
        data = vddk_stub_env.make_image(DISK_REL, size, [(0, 64 * KiB), (512 * KiB, 128 * KiB)])
        repo = tmp_path / "repo"
        assert _run(["init", str(repo), "--chunk-size", "64K"], None).returncode == 0
        uri = vcsim.uri(VM0)
        args = ["backup", uri, "--repo", str(repo), "--vddk-libdir", str(vddk_libdir),
                "--json", "--workers", "2"]

        r = _run(args, vcsim.password)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["mode"] == "full" and out["committed"] is True
        assert out["quiesced"] is True and out["consistency"] == "filesystem"
        (disk,) = out["disks"]
        assert disk["virtual_size"] == size
        assert disk["bytes_read"] == 3 * 64 * KiB  # only the allocated chunks
        assert observe_vm(vcsim)["snapshots"] == []

        r2 = _run(args, vcsim.password)  # no CBT answers from vCSim: full, with a reason
        assert r2.returncode == 0, r2.stderr
        out2 = json.loads(r2.stdout)
        assert out2["disks"][0]["full_reason"]
        assert out2["disks"][0]["chunks_new"] == 0  # all deduplicated

        target = tmp_path / "restored.raw"
        r3 = _run(["restore", "--repo", str(repo), out2["backup_id"], "--to", str(target)],
                  None)
        assert r3.returncode == 0, r3.stderr
        assert target.read_bytes() == data
    finally:
        os.environ.pop("VDDK_STUB_PASSWORD", None)


def test_cli_vsphere_bad_input_is_one_line(vcsim: Vcsim, vddk_libdir: Path,
                                           tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert _run(["init", str(repo)], None).returncode == 0
    cases = [
        # no VDDK given and no NBD transport
        (["backup", vcsim.uri(VM0), "--repo", str(repo)], vcsim.password, "--vddk-libdir"),
        # no password: no tty to prompt on
        (["backup", vcsim.uri(VM0), "--repo", str(repo), "--vddk-libdir", str(vddk_libdir)],
         None, "SNAPFERRY_VSPHERE_PASSWORD"),
        # a VM that does not exist
        (["backup", vcsim.uri("no-such-vm"), "--repo", str(repo), "--vddk-libdir",
          str(vddk_libdir)], vcsim.password, "no-such-vm"),
    ]
    for args, password, needle in cases:
        r = _run(args, password)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert needle in lines[0], lines[0]
        assert "Traceback" not in r.stderr
    assert observe_vm(vcsim)["snapshots"] == []
