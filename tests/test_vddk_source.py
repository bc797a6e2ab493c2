"""engine/sources/vddk.py (VddkSource) over the stand-in libvixDiskLib.

VDDK itself (proprietary, needs vSphere) is replaced at the library boundary by
tests/vddk_stub/; the source, the binding and the worker processes are real.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import pickle
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from snapferry.engine.errors import SourceError
from snapferry.engine.source import DiskSource, Extent
from snapferry.engine.sources.vddk import VddkConnectParams, VddkSource, VddkSpec

if TYPE_CHECKING:
    from vddkstub import StubEnv

pytest_plugins = ["vddkstub"]  # the stub fixtures

MiB = 1024 * 1024
K64 = 64 * 1024
DISK = "[datastore1] vm42/vm42.vmdk"


def _params(libdir: Path, **kw: Any) -> VddkConnectParams:
    args: dict[str, Any] = dict(
        server="vcenter.test",
        user="backup@vsphere.local",
        password="hunter2-secret",
        vm_moref="vm-42",
        snapshot_moref="snapshot-101",
        thumbprint="AA:BB",
        libdir=str(libdir),
    )
    args.update(kw)
    return VddkConnectParams(**args)


@pytest.fixture
def image(vddk_stub_env: StubEnv) -> bytes:
    # 6 MiB + 5 sectors: the tail past the last whole 64 KiB chunk is unaligned.
    return vddk_stub_env.make_image(
        "datastore1/vm42/vm42.vmdk",
        6 * MiB + 5 * 512,
        [(0, 512), (K64 + 100, 10), (2 * MiB, MiB + 7), (6 * MiB + 512, 1024)],
    )


@pytest.fixture
def source(vddk_libdir: Path, image: bytes) -> Any:
    src = VddkSource.open(_params(vddk_libdir), DISK)
    try:
        yield src
    finally:
        src.close()


def test_is_a_disk_source_with_the_right_size(source: VddkSource, image: bytes) -> None:
    assert isinstance(source, DiskSource)
    assert source.size == len(image)
    assert source.max_connections >= 1
    assert source.transport == "nbdssl"


def test_extents_follow_allocation(source: VddkSource, image: bytes) -> None:
    ext = list(source.extents())
    assert ext == [
        Extent(0, 2 * K64, zero=False),  # chunks 0 and 1 hold data
        Extent(2 * K64, 2 * MiB - 2 * K64, zero=True),
        Extent(2 * MiB, MiB + K64, zero=False),  # MiB+7 bytes round up to chunks
        Extent(3 * MiB + K64, 3 * MiB - K64, zero=True),
        Extent(6 * MiB, 5 * 512, zero=False),  # unaligned tail: always data
    ]
    # Every byte outside the data extents is zero.
    for e in ext:
        if e.zero:
            assert image[e.offset : e.end] == bytes(e.length)
    # Sub-ranges are clipped and stay gap-free.
    sub = list(source.extents(K64 + 3, 2 * MiB))
    assert sub[0] == Extent(K64 + 3, K64 - 3, zero=False)
    assert sub[-1].end == K64 + 3 + 2 * MiB
    assert all(a.end == b.offset for a, b in itertools.pairwise(sub))
    assert list(source.extents(len(image), 10)) == []


def test_dirty_extents_are_refused(source: VddkSource) -> None:
    with pytest.raises(SourceError, match="QueryChangedDiskAreas"):
        list(source.extents(dirty=True))


def test_reads_are_byte_identical_at_any_alignment(source: VddkSource, image: bytes) -> None:
    whole = bytearray(len(image))
    source.readinto(memoryview(whole), 0)
    assert whole == image
    rng = random.Random(7)
    cases = [(0, 1), (511, 2), (510, 1), (1, 511), (512, 512), (100, 5 * MiB + 3)]
    cases += [(len(image) - 7, 7), (len(image) - 513, 513)]
    for _ in range(40):
        off = rng.randrange(len(image))
        cases.append((off, rng.randrange(1, min(3 * MiB, len(image) - off) + 1)))
    for off, n in cases:
        buf = bytearray(n + 2)  # read into the middle of a larger buffer
        source.readinto(memoryview(buf)[1 : 1 + n], off)
        assert buf[1 : 1 + n] == image[off : off + n], (off, n)
        assert buf[0] == 0 and buf[-1] == 0


def test_out_of_range_and_injected_errors(
    source: VddkSource, image: bytes, monkeypatch: Any
) -> None:
    with pytest.raises(SourceError, match="outside"):
        source.readinto(memoryview(bytearray(2)), len(image) - 1)
    monkeypatch.setenv("VDDK_STUB_FAIL_SECTOR", str(2 * MiB // 512))
    with pytest.raises(SourceError) as ei:
        source.readinto(memoryview(bytearray(K64)), 2 * MiB - 100)
    assert "A file access error occurred" in str(ei.value)
    assert "(VIX error 7)" in str(ei.value)


def test_secrets_stay_out_of_describe_and_repr(source: VddkSource) -> None:
    d = source.describe()
    assert d["kind"] == "vddk" and d["vm_moref"] == "vm-42" and d["disk_path"] == DISK
    assert d["snapshot_moref"] == "snapshot-101"
    assert "hunter2-secret" not in repr(d)
    assert "hunter2-secret" not in repr(source)
    assert "hunter2-secret" not in repr(source.params)
    spec = source.spec()
    assert isinstance(spec, VddkSpec)
    assert "hunter2-secret" not in repr(spec)
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_clone_is_a_second_connection(
    source: VddkSource, image: bytes, vddk_stub_env: StubEnv
) -> None:
    other = source.clone()
    try:
        buf = bytearray(4096)
        other.readinto(memoryview(buf), 2 * MiB)
        assert buf == image[2 * MiB : 2 * MiB + 4096]
    finally:
        other.close()
    assert len(vddk_stub_env.events("connect")) == 2
    assert len(vddk_stub_env.events("open")) == 2


def test_open_errors_are_source_errors(vddk_libdir: Path, image: bytes) -> None:
    with pytest.raises(SourceError, match=r"Open of .*missing\.vmdk failed"):
        VddkSource.open(_params(vddk_libdir), "[datastore1] missing.vmdk")
    with pytest.raises(SourceError, match="VDDK not found in"):
        VddkSource.open(_params(Path("/nonexistent/vddk")), DISK)


def _worker(spec: VddkSpec, ranges: list[tuple[int, int]], q: Any) -> None:
    """A reader-pool worker: one connection + handle for all of its reads."""
    import os

    src = spec.open()
    try:
        out = []
        for off, n in ranges:
            buf = bytearray(n)
            src.readinto(memoryview(buf), off)
            out.append((off, bytes(buf)))
        q.put((os.getpid(), out))
    finally:
        src.close()


def test_spawned_workers_each_open_their_own_connection(
    source: VddkSource, image: bytes, vddk_stub_env: StubEnv
) -> None:
    spec = source.spec()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    work = [[(i * MiB, MiB) for i in range(k, 6, 2)] for k in range(2)]
    procs = [ctx.Process(target=_worker, args=(spec, w, q)) for w in work]
    for p in procs:
        p.start()
    try:
        results = [q.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    for _pid, chunks in results:
        for off, data in chunks:
            assert data == image[off : off + len(data)]
    assert sorted(off for _, c in results for off, _ in c) == [i * MiB for i in range(6)]
    worker_pids = {str(pid) for pid, _ in results}
    assert len(worker_pids) == 2
    for kind in ("init", "connect", "open", "close", "disconnect", "exit"):
        events = [e[1] for e in vddk_stub_env.events(kind) if e[1] in worker_pids]
        assert sorted(events) == sorted(worker_pids), kind  # exactly one per worker
    assert {e[1] for e in vddk_stub_env.events("read")} == worker_pids
