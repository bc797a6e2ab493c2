"""NbdSource against real servers (qemu-nbd, nbdkit) on unix sockets in tmp_path."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbdservers import (
    NbdServers,
    expected_bytes,
    extent_map_bytes,
    extent_map_plugin,
    make_image,
    nbdcopy_to_file,
    qemu_io,
    requires,
    write_commands,
)

from snapferry.engine.errors import SourceError
from snapferry.engine.source import DiskSource, Extent
from snapferry.engine.sources.nbd import NbdSource, NbdSpec, redact_uri
from snapferry.native import libnbd

pytestmark = pytest.mark.skipif(not libnbd.available(), reason="libnbd.so.0 not installed")

K = 1024
M = 1024 * 1024


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[NbdServers]:
    with NbdServers(tmp_path) as s:
        yield s


def read_all(src: NbdSource, piece: int = 3 * M + 4096) -> bytes:
    out = bytearray(src.size)
    mv = memoryview(out)
    for off in range(0, src.size, piece):
        src.readinto(mv[off : off + piece], off)
    return bytes(out)


def data_ranges(extents: list[Extent]) -> list[tuple[int, int]]:
    return [(e.offset, e.length) for e in extents if not e.zero]


def assert_tiles(extents: list[Extent], offset: int, length: int) -> None:
    """In order, no gaps, no overlaps, adjacent extents differ (coalesced)."""
    pos = offset
    for i, e in enumerate(extents):
        assert e.offset == pos and e.length > 0
        if i:
            prev = extents[i - 1]
            assert (prev.zero, prev.dirty) != (e.zero, e.dirty), "adjacent equal extents"
        pos = e.end
    assert pos == offset + length


# -- allocation maps ------------------------------------------------------------------------


@requires("qemu-nbd", "qemu-img", "qemu-io", "nbdcopy")
def test_raw_image_holes_and_data(tmp_path: Path, servers: NbdServers) -> None:
    # Size a multiple of 512 but not of 64 KiB; data at 64 KiB-aligned offsets.
    size = 6 * M + 4608
    writes = [(0, 0x11, 128 * K), (M, 0x22, 192 * K), (5 * M, 0x33, M + 4608)]
    img = make_image(tmp_path / "d.raw", size, writes)
    srv = servers.qemu_nbd(img)
    with NbdSource.open(srv.uri) as src:
        assert isinstance(src, DiskSource)
        assert src.size == size
        exts = list(src.extents())
        assert_tiles(exts, 0, size)
        assert data_ranges(exts) == [(0, 128 * K), (M, 192 * K), (5 * M, M + 4608)]
        data = read_all(src)
    assert data == bytes(expected_bytes(size, writes))
    assert data == nbdcopy_to_file(srv.uri, tmp_path / "copy.raw")


@requires("qemu-nbd", "qemu-img", "qemu-io", "nbdcopy")
def test_qcow2_zero_clusters_and_subranges(tmp_path: Path, servers: NbdServers) -> None:
    size = 8 * M
    writes = [(0, 0x41, 256 * K), (256 * K, None, 256 * K), (2 * M, 0x42, 64 * K),
              (3 * M, 0x43, M), (3 * M + 256 * K, None, 128 * K)]
    img = make_image(tmp_path / "d.qcow2", size, writes, fmt="qcow2")
    srv = servers.qemu_nbd(img, fmt="qcow2")
    with NbdSource.open(srv.uri) as src:
        exts = list(src.extents())
        assert_tiles(exts, 0, size)
        assert data_ranges(exts) == [
            (0, 256 * K), (2 * M, 64 * K), (3 * M, 256 * K), (3 * M + 384 * K, 640 * K)
        ]
        # A sub-range starting and ending inside extents is clipped exactly.
        sub = list(src.extents(100 * K, 2 * M))
        assert_tiles(sub, 100 * K, 2 * M)
        assert sub[0] == Extent(100 * K, 156 * K, zero=False)
        assert sub[-2:] == [Extent(2 * M, 64 * K, zero=False),
                            Extent(2 * M + 64 * K, 36 * K, zero=True)]
        assert list(src.extents(5, 0)) == []
        data = read_all(src, piece=M)
    assert data == bytes(expected_bytes(size, writes))
    assert data == nbdcopy_to_file(srv.uri, tmp_path / "copy.raw")


@requires("qemu-nbd", "qemu-img", "nbdcopy")
def test_random_image_matches_nbdcopy(tmp_path: Path, servers: NbdServers) -> None:
    """24 MiB of random bytes read in odd-sized pieces equal nbdcopy's copy."""
    img = tmp_path / "r.raw"
    img.write_bytes(__import__("os").urandom(24 * M))
    srv = servers.qemu_nbd(img)
    with NbdSource.open(srv.uri, request_size=512 * K, max_in_flight=16) as src:
        assert src.request_size == 512 * K
        assert read_all(src, piece=5 * M + 12345) == img.read_bytes()
    assert nbdcopy_to_file(srv.uri, tmp_path / "copy.raw") == img.read_bytes()


# -- dirty bitmaps -------------------------------------------------------------------------------


@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_dirty_bitmap_extents_are_the_written_ranges(tmp_path: Path, servers: NbdServers) -> None:
    size = 16 * M
    base = [(0, 0x11, 4 * M)]
    img = make_image(tmp_path / "d.qcow2", size, base, fmt="qcow2")
    subprocess_run = __import__("subprocess").run
    subprocess_run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    # qemu-io opens the image read-write, loads the enabled persistent bitmap, records
    # these writes in it and stores it back on close.
    changes = [(200 * K, 0x55, 10 * K), (3 * M - 4 * K, 0x56, 8 * K),
               (9 * M, 0x57, 128 * K), (12 * M + 1, 0x58, 1)]
    qemu_io(img, "qcow2", write_commands(changes))
    info = subprocess_run(["qemu-img", "info", "--output=json", str(img)],
                          check=True, capture_output=True, text=True).stdout
    assert '"b0"' in info
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    with NbdSource.open(srv.uri, bitmap="b0") as src:
        dirty = list(src.extents(dirty=True))
        assert_tiles(dirty, 0, size)
        assert all(not e.zero for e in dirty)
        g = 64 * K  # the bitmap's granularity
        assert [(e.offset, e.length) for e in dirty if e.dirty] == [
            (3 * g, g), (3 * M - g, 2 * g), (9 * M, 2 * g), (12 * M, g)
        ]
        # A query inside a dirty granule stays inside the asked range.
        assert list(src.extents(3 * M - 100, 200, dirty=True)) == [
            Extent(3 * M - 100, 200, zero=False, dirty=True)
        ]
        # The allocation map is still available on the same connection.
        assert data_ranges(list(src.extents()))[0] == (0, 4 * M)
        # And a clone negotiates the bitmap again.
        with src.clone() as other:
            assert list(other.extents(dirty=True)) == dirty
        data = read_all(src, piece=4 * M)
    assert data == bytes(expected_bytes(size, base + changes))


@requires("qemu-nbd", "qemu-img")
def test_missing_bitmap_is_a_clear_error(tmp_path: Path, servers: NbdServers) -> None:
    img = make_image(tmp_path / "d.qcow2", 2 * M, fmt="qcow2")
    __import__("subprocess").run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    with pytest.raises(SourceError) as ei:
        NbdSource.open(srv.uri, bitmap="nope")
    msg = str(ei.value)
    assert msg == (
        "bitmap nope not exported by the server: run a full backup (--mode full / without --bitmap)"
    )
    with NbdSource.open(srv.uri) as src, pytest.raises(SourceError, match="no dirty bitmap"):
        list(src.extents(dirty=True))


# -- nbdkit: short block-status replies, odd sizes, block-size limits, multi-conn -------------


MAP = [
    (0, 4096, "data"), (4096, 512, "hole,zero"), (4608, 3584, "data"), (8192, 8192, "data"),
    (16384, 4096, "zero"), (20480, 4096, "hole,zero"), (24576, 40960, "data"),
    (65536, 65536 * 3, "hole"), (262144, 1048576 + 777 - 262144, "data"),
]
MAP_SIZE = 1048576 + 777  # not a multiple of 512


@requires("nbdkit", "nbdcopy")
def test_short_block_status_replies(tmp_path: Path, servers: NbdServers) -> None:
    script = extent_map_plugin(tmp_path / "map.py", MAP_SIZE, MAP, max_per_reply=1)
    srv = servers.nbdkit("sh", str(script))
    with NbdSource.open(srv.uri) as src:
        assert src.size == MAP_SIZE
        # The server really answers with less than asked.
        h = src._handle()
        [(ctx, off, pairs)] = h.block_status(MAP_SIZE, 0)
        assert (ctx, off, pairs) == ("base:allocation", 0, [(4096, 0)])
        exts = list(src.extents())
        assert_tiles(exts, 0, MAP_SIZE)
        # "hole" without the zero flag must be read; adjacent zero kinds merge.
        assert [(e.offset, e.length, e.zero) for e in exts] == [
            (0, 4096, False), (4096, 512, True), (4608, 16384 - 4608, False),
            (16384, 8192, True), (24576, MAP_SIZE - 24576, False),
        ]
        sub = list(src.extents(4000, 20000))
        assert_tiles(sub, 4000, 20000)
        assert sub[1] == Extent(4096, 512, zero=True)
        data = read_all(src, piece=300 * K)
    assert data == extent_map_bytes(MAP_SIZE, MAP)
    assert data == nbdcopy_to_file(srv.uri, tmp_path / "copy.raw")


@requires("nbdkit")
def test_replies_running_past_the_request(tmp_path: Path, servers: NbdServers) -> None:
    script = extent_map_plugin(tmp_path / "map.py", MAP_SIZE, MAP, max_per_reply=100)
    srv = servers.nbdkit("sh", str(script))
    with NbdSource.open(srv.uri) as src:
        # Ask for 100 bytes inside the big data extent: the answer is clipped to them.
        assert list(src.extents(300000, 100)) == [Extent(300000, 100, zero=False)]
        assert list(src.extents(4100, 8000)) == [
            Extent(4100, 508, zero=True), Extent(4608, 7492, zero=False)
        ]


@requires("nbdkit")
def test_block_size_limits_and_unaligned_reads(tmp_path: Path, servers: NbdServers) -> None:
    size = 1 * M
    script = extent_map_plugin(tmp_path / "map.py", size, [(0, size, "data")])
    srv = servers.nbdkit(
        "sh", str(script),
        "blocksize-minimum=4096", "blocksize-preferred=16384", "blocksize-maximum=65536",
        "blocksize-error-policy=error",
        filters=["blocksize-policy"],
    )
    want = extent_map_bytes(size, [(0, size, "data")])
    with NbdSource.open(srv.uri, request_size=4 * M) as src:
        assert (src.block_sizes.minimum, src.block_sizes.maximum) == (4096, 65536)
        assert src.request_size == 65536
        buf = bytearray(300 * K + 123)
        src.readinto(memoryview(buf), 1000)  # unaligned both ends: bounce path
        assert buf == want[1000 : 1000 + len(buf)]
        src.readinto(memoryview(buf)[:8192], 8192)
        assert buf[:8192] == want[8192 : 8192 * 2]
        assert list(src.extents(10, 100)) == [Extent(10, 100, zero=False)]


@requires("nbdkit", "qemu-nbd", "qemu-img")
def test_multi_conn_decides_max_connections(tmp_path: Path, servers: NbdServers) -> None:
    single = servers.nbdkit("memory", "1M", "multi-conn-mode=disable", filters=["multi-conn"])
    with NbdSource.open(single.uri) as src:
        assert not src.can_multi_conn and src.max_connections == 1
    script = extent_map_plugin(tmp_path / "m.py", M, [(0, M, "data")], multi_conn=False)
    with NbdSource.open(servers.nbdkit("sh", str(script)).uri) as src:
        assert src.max_connections == 1
    img = make_image(tmp_path / "d.raw", M)
    with NbdSource.open(servers.qemu_nbd(img, shared=1).uri) as src:
        assert src.max_connections == 1  # qemu-nbd with one client: no multi-conn
    with NbdSource.open(servers.qemu_nbd(img, shared=4).uri) as src:
        assert src.can_multi_conn and src.max_connections > 1


# -- failures -------------------------------------------------------------------------------------


@requires("nbdkit")
def test_server_dying_mid_read_is_a_source_error(tmp_path: Path, servers: NbdServers) -> None:
    size = 8 * M
    script = extent_map_plugin(tmp_path / "map.py", size, [(0, size, "data")], kill_at=5 * M)
    srv = servers.nbdkit("sh", str(script))
    src = NbdSource.open(srv.uri, request_size=256 * K, max_in_flight=4)
    try:
        buf = bytearray(size)
        src.readinto(memoryview(buf)[: 4 * M], 0)  # before the trap: fine
        with pytest.raises(SourceError) as ei:
            src.readinto(memoryview(buf), 0)
        msg = str(ei.value)
        assert "\n" not in msg and "read of 8388608 bytes at offset 0" in msg
        assert srv.wait_exit() == -9  # the server really died mid-read
        # The source stays closed-for-business, with a clear error, not a crash.
        with pytest.raises(SourceError):
            src.readinto(memoryview(buf)[:4096], 0)
    finally:
        src.close()


@requires("nbdkit")
def test_server_read_errors_are_source_errors(tmp_path: Path, servers: NbdServers) -> None:
    srv = servers.nbdkit("memory", "4M", "error-pread-rate=100%", "error-pread=EIO",
                         filters=["error"])
    with NbdSource.open(srv.uri) as src:
        with pytest.raises(SourceError, match="Input/output error"):
            src.readinto(memoryview(bytearray(M)), 0)
        assert srv.alive()


@requires("qemu-nbd", "qemu-img")
def test_reconnects_once_after_a_server_restart(tmp_path: Path, servers: NbdServers) -> None:
    img = tmp_path / "r.raw"
    img.write_bytes(bytes(range(256)) * (4 * M // 256))
    srv = servers.qemu_nbd(img)
    with NbdSource.open(srv.uri) as src:
        srv.kill()
        srv.socket.unlink()
        srv.start()  # same socket, new process
        buf = bytearray(M)
        src.readinto(memoryview(buf), M + 7)
        assert buf == img.read_bytes()[M + 7 : 2 * M + 7]


def test_connect_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as ei:
        NbdSource.open(f"nbd+unix:///?socket={tmp_path}/absent.sock")
    assert str(ei.value).startswith("cannot connect to NBD server nbd+unix:///?socket=")
    assert "\n" not in str(ei.value)
    # TLS key paths in the URI are neither refused nor echoed back.
    with pytest.raises(SourceError) as ei:
        NbdSource.open(f"nbds+unix:///?socket={tmp_path}/absent.sock&tls-psk-file=/k/secret")
    assert "No such file or directory" in str(ei.value) and "secret" not in str(ei.value)
    with pytest.raises(SourceError, match="not an NBD URI"):
        NbdSource.open("file:///etc/passwd")


# -- spec, clone, describe -----------------------------------------------------------------------


@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_spec_pickles_and_describe_hides_secrets(tmp_path: Path, servers: NbdServers) -> None:
    writes = [(64 * K, 0x7A, 64 * K)]
    img = make_image(tmp_path / "d.raw", 2 * M, writes)
    srv = servers.qemu_nbd(img, export="disk0")
    with NbdSource.open(srv.uri) as src:
        spec = pickle.loads(pickle.dumps(src.spec()))
        assert isinstance(spec, NbdSpec) and spec == src.spec()
        with spec.open() as other:
            buf = bytearray(64 * K)
            other.readinto(memoryview(buf), 64 * K)
            assert buf == b"\x7a" * (64 * K)
        d = src.describe()
        assert d["kind"] == "nbd" and d["export"] == "disk0" and d["size"] == 2 * M
        assert d["uri"] == srv.uri
    assert redact_uri("nbds://me:pw@h:10809/x?tls-psk-file=/k&socket=/s") == (
        "nbds://h:10809/x?socket=/s"
    )


@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_single_client_server_release_lets_another_client_in(
    tmp_path: Path, servers: NbdServers
) -> None:
    """qemu-nbd without -e serves one client at a time. ``spec()`` keeps this object's
    connection (a server without -t would exit if it were dropped), so the server has
    no room (``spare_connections`` 0); an explicit ``release()`` lets another client in,
    and the released source reconnects on its next use."""
    writes = [(0, 0x21, 256 * K)]
    img = make_image(tmp_path / "d.raw", 2 * M, writes)
    srv = servers.qemu_nbd(img, shared=1)
    with NbdSource.open(srv.uri) as src:
        assert src.max_connections == 1
        exts = list(src.extents())
        spec = src.spec()
        assert src.spare_connections(1, timeout_ms=500) == 0
        src.release()
        with spec.open() as worker:
            buf = bytearray(256 * K)
            worker.readinto(memoryview(buf), 0)
            assert buf == b"\x21" * (256 * K)
            # While the worker holds the only slot, another client gets a clear error
            # after the handshake deadline instead of hanging.
            with pytest.raises(SourceError, match="no handshake from the server"):
                NbdSource.open(srv.uri, connect_timeout_ms=500)
        # The released source reconnects on its next use.
        assert list(src.extents()) == exts
        src.readinto(memoryview(buf), 0)
        assert buf == b"\x21" * (256 * K)


@requires("nbdkit")
def test_stalled_server_read_times_out(servers: NbdServers) -> None:
    srv = servers.nbdkit("memory", "2M", "delay-read=30", filters=["delay"])
    with (
        NbdSource.open(srv.uri, read_timeout_ms=300) as src,
        pytest.raises(SourceError, match=r"no reply from the server in 0\.3 s"),
    ):
        src.readinto(memoryview(bytearray(64 * K)), 0)
