"""The cffi libnbd binding (snapferry.native.libnbd) against real qemu-nbd / nbdkit servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbdservers import NbdServers, requires

from snapferry.engine.errors import SourceError
from snapferry.native import libnbd
from snapferry.native.libnbd import NbdError, NbdHandle

pytestmark = pytest.mark.skipif(not libnbd.available(), reason="libnbd.so.0 not installed")

M = 1024 * 1024


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[NbdServers]:
    with NbdServers(tmp_path) as s:
        yield s


@pytest.fixture
def random_image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(12 * M + 4096)
    img = tmp_path / "r.raw"
    img.write_bytes(data)
    return img, data


@requires("qemu-nbd")
def test_handle_facts_and_sync_read(
    servers: NbdServers, random_image: tuple[Path, bytes]
) -> None:
    img, data = random_image
    srv = servers.qemu_nbd(img, shared=2)
    with NbdHandle("t") as h:
        h.add_meta_context("base:allocation")
        h.connect_uri(srv.uri)
        assert h.get_size() == len(data)
        assert h.can_multi_conn() and h.is_read_only()
        assert h.structured_replies_negotiated()
        assert h.can_meta_context("base:allocation")
        assert not h.can_meta_context("qemu:dirty-bitmap:x")
        sizes = h.block_sizes()
        assert sizes.minimum >= 1 and sizes.maximum >= M
        buf = bytearray(100_000)
        h.pread(buf, 12345)
        assert buf == data[12345 : 12345 + 100_000]
        [(ctx, off, pairs)] = h.block_status(len(data), 0)
        assert ctx == "base:allocation" and off == 0
        assert sum(n for n, _ in pairs) >= 4096 and all(f == 0 for _, f in pairs)
    assert h.closed


@requires("qemu-nbd")
@pytest.mark.parametrize(("request_size", "in_flight"), [(M, 1), (256 * 1024, 16), (3 * M, 4)])
def test_pread_many_fills_disjoint_slices(
    servers: NbdServers, random_image: tuple[Path, bytes], request_size: int, in_flight: int
) -> None:
    img, data = random_image
    srv = servers.qemu_nbd(img)
    with NbdHandle() as h:
        h.set_pread_initialize(False)
        h.connect_uri(srv.uri)
        buf = bytearray(len(data) - 5000)
        h.pread_many(memoryview(buf), 5000, request_size, in_flight)
        assert buf == data[5000:]
        # Several scattered ranges of one buffer in one go.
        buf2 = bytearray(4 * M)
        h.pread_ranges(buf2, [(0, 4096), (M, 2 * M), (4 * M - 10, 10)], 8 * M,
                       request_size, in_flight)
        assert buf2[:4096] == data[8 * M : 8 * M + 4096]
        assert buf2[M : 3 * M] == data[9 * M : 11 * M]
        assert buf2[-10:] == data[12 * M - 10 : 12 * M]
        assert buf2[4096:M] == bytes(M - 4096)  # untouched


@requires("nbdkit")
def test_errors_carry_libnbd_text(servers: NbdServers, tmp_path: Path) -> None:
    srv = servers.nbdkit("memory", "1M")
    with NbdHandle() as h:
        with pytest.raises(NbdError) as ei:
            h.connect_uri(f"nbd+unix:///?socket={tmp_path}/nothing.sock")
        assert isinstance(ei.value, SourceError)
        assert "No such file or directory" in str(ei.value) and ei.value.errno != 0
    with NbdHandle() as h:
        h.connect_uri(srv.uri)
        with pytest.raises(NbdError, match="writable"):
            h.pread(b"immutable", 0)
        with pytest.raises(NbdError, match="read failed"):
            h.pread_many(bytearray(4096), M - 100, 4096)  # past the end
        # Refused before anything was sent: the connection stays usable.
        assert not h.closed and h.get_size() == M
    h.close()
    with pytest.raises(NbdError, match="closed"):
        h.get_size()


@requires("nbdkit")
def test_failure_with_requests_in_flight_drops_the_connection(servers: NbdServers) -> None:
    srv = servers.nbdkit("memory", "4M", "error-pread-rate=100%", "error-pread=EIO",
                         filters=["error"])
    with NbdHandle() as h:
        h.connect_uri(srv.uri)
        with pytest.raises(NbdError, match="Input/output error") as ei:
            h.pread_many(bytearray(4 * M), 0, 256 * 1024, 8)
        assert ei.value.errno != 0
        # Other requests were still in flight into the buffer: the handle is closed so
        # that no late reply can land there.
        assert h.closed


def test_declarations_parsed_at_setup_are_used_when_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/setup.sh writes native/_libnbd_ffi.py (the declarations pre-parsed):
    loading libnbd then imports neither cffi's parser nor pycparser; a file made from
    other declarations is not used (parsed as before)."""
    import subprocess
    import sys

    from snapferry.native import ffi_build

    made = ffi_build.build(tmp_path)
    assert f'CDEF_SHA256 = "{ffi_build.cdef_digest()}"' in made.read_text()
    if not (Path(libnbd.__file__).parent / "_libnbd_ffi.py").exists():
        pytest.skip("native/_libnbd_ffi.py is not built (run scripts/setup.sh)")
    probe = ("import sys; from snapferry.native import libnbd; libnbd.load(); "
             "print(sorted(m for m in ('pycparser', 'cffi.cparser') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
    assert libnbd._prebuilt_ffi() is not None
    monkeypatch.setattr(ffi_build, "cdef_digest", lambda: "0" * 64)  # stale file
    assert libnbd._prebuilt_ffi() is None
    ffi = libnbd._parsed_ffi()
    lib = ffi.dlopen("libnbd.so.0")
    h = lib.nbd_create()  # the declarations parsed here drive the real library
    assert h != ffi.NULL
    lib.nbd_close(h)
