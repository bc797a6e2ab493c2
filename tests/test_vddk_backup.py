"""A backup through the real reader pool from a VddkSource, restored byte for byte.

VDDK (proprietary, needs vSphere) is replaced at the library boundary by the stand-in
libvixDiskLib (tests/vddk_stub/); pool, workers, store and restore are real.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from snapferry.engine.backup import BackupOptions, DiskInput, run_backup
from snapferry.engine.errors import SourceError
from snapferry.engine.restore import restore
from snapferry.engine.sources.vddk import VddkConnectParams, VddkSource
from snapferry.engine.store import Repository

if TYPE_CHECKING:
    from vddkstub import StubEnv

pytest_plugins = ["vddkstub"]  # the stub fixtures

MiB = 1024 * 1024
DISK = "[datastore1] vm42/vm42.vmdk"


@pytest.fixture
def source(vddk_libdir: Path, vddk_stub_env: StubEnv) -> Any:
    # 12 MiB + 3 sectors: data, holes, an unaligned tail.
    vddk_stub_env.make_image(
        "datastore1/vm42/vm42.vmdk",
        12 * MiB + 3 * 512,
        [(0, 70_000), (3 * MiB + 4096, 2 * MiB), (9 * MiB, 512), (12 * MiB, 3 * 512)],
    )
    params = VddkConnectParams(
        server="vcenter.test",
        user="backup",
        password="never-in-manifest",
        vm_moref="vm-42",
        snapshot_moref="snapshot-9",
        libdir=str(vddk_libdir),
    )
    src = VddkSource.open(params, DISK)
    try:
        yield src
    finally:
        src.close()


def test_backup_from_vddk_restores_identical(
    source: VddkSource, vddk_stub_env: StubEnv, tmp_path: Path
) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=256 << 10, zstd_level=3)
    res = run_backup(
        repo,
        "vm42",
        [DiskInput(name="sda", source=source)],
        BackupOptions(workers=2),
        consistency="crash",
    )
    image = (vddk_stub_env.diskdir / "datastore1/vm42/vm42.vmdk").read_bytes()
    (d,) = res.disks
    assert d.virtual_size == len(image)
    assert d.zero_chunks > 0  # the holes were never read
    assert d.bytes_read < len(image)
    out = tmp_path / "restored.raw"
    restore(repo, res.backup_id, to=out, workers=2)
    assert out.read_bytes() == image
    # Workers read through their own VDDK connections, InitEx once in each.
    me = str(os.getpid())
    reads = {e[1] for e in vddk_stub_env.events("read")}
    assert reads and me not in reads
    inits = [e[1] for e in vddk_stub_env.events("init")]
    assert sorted(inits) == sorted(set(inits)) and set(inits) >= reads
    manifest = next((tmp_path / "repo" / "snapshots").iterdir()).read_text()
    assert "never-in-manifest" not in manifest and "vm-42" in manifest


def test_worker_read_error_fails_the_backup_cleanly(
    source: VddkSource, vddk_stub_env: StubEnv, tmp_path: Path, monkeypatch: Any
) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=256 << 10, zstd_level=3)
    monkeypatch.setenv("VDDK_STUB_FAIL_SECTOR", str((3 * MiB + 8192) // 512))
    with pytest.raises(SourceError) as ei:
        run_backup(
            repo,
            "vm42",
            [DiskInput(name="sda", source=source)],
            BackupOptions(workers=2),
            consistency="crash",
        )
    assert "A file access error occurred" in str(ei.value)
    assert "(VIX error 7)" in str(ei.value) and "\n" not in str(ei.value)
    assert list((tmp_path / "repo" / "snapshots").glob("*")) == []
