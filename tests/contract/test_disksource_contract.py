"""The ``DiskSource`` contract, run over every implementation.

One disk layout (data, holes, a zero range, an unaligned tail of three sectors) is
served by every source the project has:

=================  ==========================================================
``file``           ``FileSource`` on a sparse raw file
``nbd-qemu``       ``NbdSource`` on ``qemu-nbd`` exporting the raw file
``nbd-qemu-qcow2`` ``NbdSource`` with a dirty bitmap, ``qemu-nbd`` on a qcow2
``nbd-nbdkit``     ``NbdSource`` on ``nbdkit file``
``vddk``           ``VddkSource`` through the stand-in libvixDiskLib
``restore-point``  ``RestorePointSource`` over a backup of the raw file
=================  ==========================================================

and each must pass the same tests: size, an allocation map that covers the asked range
in order without gaps and never calls data zero, reads at any offset and length, a
picklable spec that opens the same disk in a spawned worker process, a changed-block
map where (and only where) the source has one, facts for the manifest without secrets,
and a real backup + restore through the reader pool that gives the bytes back. A new
``DiskSource`` proves itself by being added to ``IMPLEMENTATIONS`` and passing.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from nbdservers import NbdServers, qemu_io

from snapferry.engine.backup import BackupOptions, run_backup
from snapferry.engine.errors import SourceError
from snapferry.engine.restore import restore
from snapferry.engine.source import DiskSource, SourceSpec
from snapferry.engine.store.repo import Repository
from snapferry.native import libnbd

if TYPE_CHECKING:  # loaded as a plugin (importing it here too upsets pytest)
    from vddkstub import StubEnv

pytest_plugins = ["vddkstub"]  # the stand-in VDDK fixtures

K = 1024
M = 1024 * K
SIZE = 8 * M + 3 * 512  # not a multiple of the chunk size: a short last chunk
DATA = [(0, 4096), (64 * K + 100, 10), (1 * M, 3 * M + 7), (5 * M, 64 * K),
        (8 * M, 3 * 512)]  # the last: the unaligned tail
DIRTY_WRITES = [(1 * M, 64 * K), (6 * M + 512, 4096)]  # qcow2 case: after the bitmap
VDDK_DISK = "[datastore1] vm42/vm42.vmdk"
SECRET = "hunter2-contract"


def write_layout(path: Path) -> bytes:
    rng = random.Random(99)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, ln in DATA:
            f.seek(off)
            f.write(rng.randbytes(ln))
    return path.read_bytes()


@dataclass
class Case:
    source: DiskSource
    data: bytes
    dirty: list[tuple[int, int]] | None = None  # the changed-block map, if it has one
    closers: list[Callable[[], None]] = field(default_factory=list)


def _nbd(kind: str, tmp_path: Path, servers: NbdServers) -> Case:
    from snapferry.engine.sources.nbd import NbdSource

    if not libnbd.available():
        pytest.skip("libnbd.so.0 not installed")
    raw = tmp_path / "d.raw"
    data = write_layout(raw)
    if kind == "nbd-qemu":
        _need("qemu-nbd")
        srv = servers.qemu_nbd(raw, fmt="raw")
        return Case(NbdSource.open(srv.uri), data)
    if kind == "nbd-qemu-qcow2":
        _need("qemu-nbd", "qemu-img", "qemu-io")
        img = tmp_path / "d.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img)], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
        qemu_io(img, "qcow2", [f"write -P 0x7e {o} {n}" for o, n in DIRTY_WRITES])
        want = bytearray(data)
        for o, n in DIRTY_WRITES:
            want[o : o + n] = b"\x7e" * n
        srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
        return Case(NbdSource.open(srv.uri, bitmap="b0"), bytes(want), DIRTY_WRITES)
    _need("nbdkit")
    srv = servers.nbdkit("file", str(raw))
    return Case(NbdSource.open(srv.uri), data)


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed)")


IMPLEMENTATIONS = ["file", "nbd-qemu", "nbd-qemu-qcow2", "nbd-nbdkit", "vddk", "restore-point"]


def _restore_point(tmp_path: Path) -> Case:
    """The layout backed up (64 KiB chunks: its holes are whole zero chunks), then read
    back from the repository."""
    from store_helpers import backup_image

    from snapferry.engine.sources.restore_point import RestorePointSource

    raw = tmp_path / "d.raw"
    data = write_layout(raw)
    repo = Repository.init(tmp_path / "rp-repo", chunk_size=64 * K)
    m = backup_image(repo, {"disk": raw})
    raw.unlink()  # the data now lives in the repository only
    return Case(RestorePointSource.open(tmp_path / "rp-repo", m.backup_id), data)


@pytest.fixture(params=IMPLEMENTATIONS)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    kind: str = request.param
    servers = NbdServers(tmp_path)
    c: Case
    try:
        if kind == "file":
            from snapferry.engine.sources.file import FileSource

            raw = tmp_path / "d.raw"
            data = write_layout(raw)
            c = Case(FileSource(raw), data)
        elif kind == "vddk":
            from snapferry.engine.sources.vddk import VddkConnectParams, VddkSource

            libdir: Path = request.getfixturevalue("vddk_libdir")
            env: StubEnv = request.getfixturevalue("vddk_stub_env")
            disk = env.diskdir / "datastore1" / "vm42" / "vm42.vmdk"
            disk.parent.mkdir(parents=True)
            data = write_layout(disk)
            params = VddkConnectParams(server="vcenter.test", user="backup@vsphere.local",
                                       password=SECRET, vm_moref="vm-42",
                                       snapshot_moref="snapshot-7", thumbprint="AA:BB",
                                       libdir=str(libdir))
            c = Case(VddkSource.open(params, VDDK_DISK), data)
        elif kind == "restore-point":
            c = _restore_point(tmp_path)
        else:
            c = _nbd(kind, tmp_path, servers)
        yield c
        c.source.close()
    finally:
        servers.stop_all()


# -- size and allocation ------------------------------------------------------------------


def test_size(case: Case) -> None:
    assert isinstance(case.source, DiskSource)
    assert case.source.size == len(case.data) == SIZE


def _check_cover(extents: list[Any], start: int, end: int) -> None:
    pos = start
    for e in extents:
        assert e.offset == pos, (e, pos)
        assert e.length > 0
        pos = e.end
    assert pos == end


@pytest.mark.parametrize("start,length", [(0, None), (4096, 2 * M + 3), (SIZE - 700, 700),
                                          (3 * M, 0)])
def test_allocation_map_covers_the_range_and_never_hides_data(
    case: Case, start: int, length: int | None
) -> None:
    end = SIZE if length is None else start + length
    ext = list(case.source.extents(start, length, dirty=False))
    _check_cover(ext, start, end)
    for e in ext:
        if e.zero:  # a range called zero must read as zeros
            assert case.data[e.offset : e.end].count(0) == e.length, e


def test_allocation_map_skips_the_big_hole(case: Case) -> None:
    """Every source here knows its holes: the 1 MiB hole at 6 MiB..7 MiB (no data was
    ever written there in the raw layout) is reported zero, so a full backup skips it."""
    hole = (6 * M + 64 * K, 7 * M) if case.dirty else (5 * M + 64 * K, 8 * M)
    zero = [e for e in case.source.extents(dirty=False) if e.zero]
    assert any(e.offset <= hole[0] and e.end >= hole[1] for e in zero), zero


# -- reads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offset,length", [
    (0, 4096), (0, 1), (100, 3000), (64 * K + 90, 30), (M - 5, 10), (M, 2 * M),
    (SIZE - 512, 512), (SIZE - 3 * 512 - 7, 3 * 512 + 7), (7 * M, 4096), (0, SIZE),
])
def test_reads_any_offset_and_length(case: Case, offset: int, length: int) -> None:
    buf = bytearray(length)
    case.source.readinto(memoryview(buf), offset)
    assert bytes(buf) == case.data[offset : offset + length]


def test_read_past_the_end_fails_cleanly(case: Case) -> None:
    with pytest.raises((SourceError, ValueError)):
        case.source.readinto(memoryview(bytearray(1024)), SIZE - 512)


# -- another connection ----------------------------------------------------------------


def _read_in_worker(spec: SourceSpec, offset: int, length: int) -> bytes:
    src = spec.open()
    try:
        buf = bytearray(length)
        src.readinto(memoryview(buf), offset)
        return bytes(buf)
    finally:
        src.close()


def test_spec_is_picklable_and_opens_the_same_disk_in_a_spawned_process(case: Case) -> None:
    spec = case.source.spec()
    spec = pickle.loads(pickle.dumps(spec))
    with mp.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_read_in_worker, (spec, M - 100, 200 * K))
    assert got == case.data[M - 100 : M - 100 + 200 * K]


def test_clone_is_an_independent_connection(case: Case) -> None:
    other = case.source.clone()
    try:
        assert other.size == case.source.size
        a, b = bytearray(8192), bytearray(8192)
        other.readinto(memoryview(a), 0)
        case.source.readinto(memoryview(b), 0)
        assert a == b == case.data[:8192]
    finally:
        other.close()
    b2 = bytearray(16)  # closing the clone leaves the original usable
    case.source.readinto(memoryview(b2), M)
    assert b2 == case.data[M : M + 16]


# -- changed blocks ------------------------------------------------------------------------


def test_changed_block_map_only_where_there_is_one(case: Case) -> None:
    if case.dirty is None:
        with pytest.raises(SourceError):
            list(case.source.extents(dirty=True))
        return
    ext = list(case.source.extents(dirty=True))
    _check_cover(ext, 0, SIZE)
    for off, ln in case.dirty:  # every write is inside a dirty extent
        assert any(e.dirty and e.offset <= off and e.end >= off + ln for e in ext), (off, ext)
    dirty_bytes = sum(e.length for e in ext if e.dirty)
    assert dirty_bytes <= 4 * 64 * K  # bitmap granularity 64 KiB: nothing else


# -- facts ---------------------------------------------------------------------------------


def test_describe_is_json_without_secrets(case: Case) -> None:
    desc = case.source.describe()
    assert isinstance(desc.get("kind"), str)
    text = json.dumps(desc)
    assert SECRET not in text and "password" not in text


# -- the whole pipeline ------------------------------------------------------------------


def test_backup_and_restore_through_the_reader_pool(case: Case, tmp_path: Path) -> None:
    from snapferry.engine.planning import DiskInput

    repo = Repository.init(tmp_path / "repo", chunk_size=64 * K)
    res = run_backup(repo, "contract", [DiskInput("disk", case.source)],
                     BackupOptions(workers=2), consistency="crash")
    (d,) = res.disks
    assert d.virtual_size == SIZE
    assert d.bytes_read < SIZE  # the holes were skipped
    out = tmp_path / "restored.raw"
    restore(repo, res.backup_id, to=out)
    assert out.read_bytes() == case.data
