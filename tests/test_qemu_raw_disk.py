"""A VM whose disk is a RAW image (issue 14): full backups every time, said once per run,
through the real CLI on a real QEMU guest (one boot: the lab's kernel + initramfs with
one raw data disk). Both strategies (overlay, fleecing) are used on the same VM; each
restore point restores to a clean ext4 holding the files written before it; the VM ends
on its base disk with no overlay, export, job or bitmap; ``--mode incremental`` is one
clear error line.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from coordvm import CHUNK, check_restore_point, cli, count_backups, vm_work_dir, write_known
from labvm import assert_vm_clean, bitmaps, lab_missing

from snapferry.engine.qemu.backend import RAW_FULL_REASON
from snapferry.engine.restore import restore
from snapferry.engine.store.manifest import Manifest
from snapferry.engine.store.repo import Repository
from snapferry.lab import check as labcheck
from snapferry.lab import vm as labvm_mod
from snapferry.lab.initramfs import build_initramfs
from snapferry.lab.vm import LabVm, lab_down

pytestmark = pytest.mark.vm

REASON = RAW_FULL_REASON.format(name="disk0")


@pytest.fixture(scope="module")
def raw_vm() -> Iterator[LabVm]:
    why = lab_missing()
    if why:
        pytest.skip(f"lab VM unavailable: {why}")
    d = Path(tempfile.mkdtemp(prefix="sfraw-"))  # short unix socket paths
    try:
        disk = d / "disk0.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "32M"], check=True)
        subprocess.run(["mkfs.ext4", "-F", "-q", "-L", "data0",
                        "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", str(disk)],
                       check=True, capture_output=True)
        kernel, initrd = build_initramfs(d / "build")
        accel = labvm_mod._accel_choice(d)
        accel = "tcg" if accel == "probe-kvm" else accel
        # the lab's own QEMU command line, with the data disk's format node raw
        cmd = [a.replace("driver=qcow2,node-name=lab-disk0", "driver=raw,node-name=lab-disk0")
               for a in labvm_mod._qemu_cmd(d, kernel.image, initrd, [disk], accel, False)]
        assert any(a.startswith("driver=raw,") for a in cmd)
        subprocess.run(cmd, check=True, capture_output=True)
        pid = labvm_mod._read_pid(d)
        assert pid is not None
        labvm_mod._wait_agent(str(d / "qga.sock"), pid, labvm_mod.BOOT_TIMEOUT)
        yield LabVm(lab_dir=d, qmp_socket=str(d / "qmp.sock"),
                    agent_socket=str(d / "qga.sock"), control_socket=str(d / "lab-qmp.sock"),
                    pid=pid, disks=[str(disk)], accel=accel)
    finally:
        lab_down(d)
        shutil.rmtree(d, ignore_errors=True)


def _backup(vm: LabVm, repo: Repository, *extra: str) -> tuple[Manifest, str]:
    """One backup through the CLI (human output: the progress notes go to stderr); the
    restore point it made and its stderr."""
    before = {m.backup_id for m in repo.list_backups()}
    p = cli(["backup", vm.uri, "--repo", str(repo.path), *extra])
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    new = [m for m in repo.list_backups() if m.backup_id not in before]
    assert len(new) == 1
    return new[0], p.stderr


def _is_raw_full(m: Manifest, err: str) -> None:
    assert m.parent is None  # a full backup
    (d,) = m.disks
    assert d.name == "disk0" and d.full_reason == REASON
    assert not d.tracking.get("bitmap")
    assert err.count("is raw: full backups only") == 1, err  # said once
    assert f"snapferry: warning: {REASON}\n" in err, err  # as one line, name not doubled


def _clean(vm: LabVm, work: Path) -> None:
    assert_vm_clean(vm, work, unlocked=True)
    assert bitmaps(vm) == {}  # no stray snapferry (or any) bitmap on the raw node
    assert list(work.glob("*.sf-fleece.qcow2")) == []


def test_raw_disk_full_backups(raw_vm: LabVm, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    work = vm_work_dir(raw_vm, tmp_path, monkeypatch)
    repo = Repository.init(tmp_path / "repo", chunk_size=CHUNK)

    files1 = write_known(raw_vm, "raw1", 2)
    first, err = _backup(raw_vm, repo, "--mode", "full", "--quiesce", "required")
    _is_raw_full(first, err)
    _clean(raw_vm, work)

    files2 = write_known(raw_vm, "raw2", 2)
    second, err = _backup(raw_vm, repo)  # --mode auto: full again, said once
    _is_raw_full(second, err)
    _clean(raw_vm, work)

    files3 = write_known(raw_vm, "raw3", 1)
    fleeced, err = _backup(raw_vm, repo, "--qemu-strategy", "fleecing")
    _is_raw_full(fleeced, err)
    _clean(raw_vm, work)

    # --mode incremental: one clear line, nothing written, the VM left clean
    for strategy in ("overlay", "fleecing"):
        p = cli(["backup", raw_vm.uri, "--repo", str(repo.path), "--mode", "incremental",
                 "--qemu-strategy", strategy])
        assert p.returncode != 0
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("snapferry: "), p.stderr
        assert "is raw" in lines[0] and "incremental" in lines[0], lines[0]
        _clean(raw_vm, work)
    assert count_backups(repo) == 3

    check_restore_point(repo, first.backup_id, files1, tmp_path)
    check_restore_point(repo, second.backup_id, {**files1, **files2}, tmp_path)
    check_restore_point(repo, fleeced.backup_id, {**files1, **files2, **files3},
                        tmp_path)
    # the first restore point is the point in time before files2 were written
    out = tmp_path / "first-again.raw"
    restore(repo, first.backup_id, to=out, disk="disk0", fmt="raw")
    assert "known-raw2-0.txt" not in labcheck.list_dir(out)
