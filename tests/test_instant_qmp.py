"""``snapferry instant BACKUP --qmp SOCKET``: the restore point's disks as block nodes in
an arbitrary running QEMU (here a bare one, ``-machine none``), read back through
QEMU's own NBD server byte-identical to the image, written through the overlay without
touching the repository, removed again on SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import servecli
from conftest import ROOT, cli_env, snapferry_exe
from servecli import needs_serve, pid_alive
from store_helpers import backup_image, make_mixed_image

from snapferry.engine.qemu.qmp import Qmp
from snapferry.engine.store import Repository

pytestmark = [needs_serve, pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                              reason="qemu-system-x86_64 is not installed")]
short_dir = servecli.short_dir


def _files(repo: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in repo.rglob("*") if p.is_file()}


def test_qmp_attach_to_a_running_qemu(tmp_path: Path, short_dir: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=256 << 10)
    img = tmp_path / "disk.img"
    make_mixed_image(img, 8 << 20, seed=4)
    bid = backup_image(repo, {"vda": img}).backup_id
    before = _files(repo.path)
    qmp = short_dir / "qmp.sock"
    qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults",
                             "-display", "none", "-qmp", f"unix:{qmp},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    inst: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        while not qmp.exists():
            assert qemu.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        inst = subprocess.Popen(
            [*snapferry_exe(), "instant", bid, "--repo", str(repo.path), "--qmp", str(qmp),
             "--lab-dir", str(short_dir / "w"), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
        assert inst.stdout is not None
        ev = json.loads(inst.stdout.readline() or "{}")
        assert ev.get("event") == "attached", inst.communicate(timeout=30)
        (node,) = ev["nodes"]
        assert node["node"] == "sf-inst-vda"
        q = Qmp(str(qmp), timeout=30.0)
        exp = short_dir / "e.sock"
        try:
            q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(exp)}}})
            q.cmd("block-export-add", {"type": "nbd", "id": "t", "node-name": "sf-inst-vda",
                                       "writable": True})
            uri = f"nbd+unix:///sf-inst-vda?socket={exp}"
            out = tmp_path / "out.raw"
            subprocess.run(["nbdcopy", uri, str(out)], check=True)
            assert out.read_bytes() == img.read_bytes()
            subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 4096 65536", uri],
                           check=True, capture_output=True)
            subprocess.run(["nbdcopy", uri, str(out)], check=True)
            got = out.read_bytes()
            assert got[4096:4096 + 65536] == b"\xab" * 65536
            assert got[:4096] == img.read_bytes()[:4096]
            q.cmd("block-export-del", {"id": "t", "mode": "hard"})
            deadline = time.monotonic() + 10
            while q.cmd("query-block-exports") and time.monotonic() < deadline:
                time.sleep(0.05)
            q.cmd("nbd-server-stop")
        finally:
            q.close()
        inst.send_signal(signal.SIGTERM)
        stdout, err = inst.communicate(timeout=60)
        assert inst.returncode == 0, err
        assert json.loads(stdout.strip().splitlines()[-1]) == {"event": "stopped", "kept": []}
        assert not pid_alive(int(node["nbdkit_pid"]))
        q = Qmp(str(qmp), timeout=30.0)
        try:
            names = {n["node-name"] for n in q.cmd("query-named-block-nodes", {"flat": True})}
        finally:
            q.close()
        assert "sf-inst-vda" not in names
        assert Path(node["overlay"]).exists(), "the overlay (the guest's writes) stays"
    finally:
        if inst is not None and inst.poll() is None:
            inst.kill()
            inst.communicate()
        qemu.kill()
        qemu.communicate()
    assert _files(repo.path) == before, "the repository is only read (and no lock is left)"
