"""native/vddk.py against the stand-in libvixDiskLib (tests/vddk_stub/).

The real VDDK is proprietary and needs a vSphere host, so the boundary is replaced by
our own C library with the same symbols and struct layouts; everything on our side
(cffi binding, loading, error handling, process rules) runs for real.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from snapferry.engine.errors import SourceError
from snapferry.native import vddk

if TYPE_CHECKING:
    from vddkstub import StubEnv

pytest_plugins = ["vddkstub"]  # the stub fixtures

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def _connect(lib: vddk.VddkLibrary, **kw: Any) -> vddk.VddkConnection:
    args: dict[str, Any] = dict(
        server="vcenter.test",
        vm_moref="vm-42",
        user="backup",
        password="s3cret",
        thumbprint="AA:BB:CC",
        snapshot_moref="snapshot-7",
        transport_modes="nbdssl:nbd",
    )
    args.update(kw)
    return lib.connect(**args)


def _run_py(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def disk(vddk_stub_env: StubEnv) -> tuple[Path, bytes]:
    """8 MiB + 3 sectors (unaligned tail), data in three places, holes elsewhere."""
    rel = "datastore1/vm42/vm42.vmdk"
    data = vddk_stub_env.make_image(
        rel,
        8 * MiB + 3 * 512,
        [(0, 4096), (1 * MiB + 512, 200 * 1024), (5 * MiB, 3 * MiB + 3 * 512)],
    )
    return vddk_stub_env.diskdir / rel, data


def test_struct_layouts_match_the_c_compiler(vddk_libdir: Path) -> None:
    # The stub reports sizeof/offsetof as gcc computes them for vixDiskLib.h's structs.
    stub = vddk.ffi.dlopen(str(vddk_libdir / "libvixDiskLib.so.8"))
    ffi2 = vddk.FFI()
    ffi2.cdef("uint64_t VddkStub_Layout(int which);")
    layout = ffi2.dlopen(str(vddk_libdir / "libvixDiskLib.so.8")).VddkStub_Layout
    f = vddk.ffi
    ours = [
        f.sizeof("VixDiskLibConnectParams"),
        f.offsetof("VixDiskLibConnectParams", "credType"),
        f.offsetof("VixDiskLibConnectParams", "creds"),
        f.offsetof("VixDiskLibConnectParams", "port"),
        f.offsetof("VixDiskLibConnectParams", "nfcHostPort"),
        f.offsetof("VixDiskLibConnectParams", "spec"),
        f.offsetof("VixDiskLibConnectParams", "specType"),
        f.sizeof("VixDiskLibInfo"),
        f.offsetof("VixDiskLibInfo", "capacity"),
        f.offsetof("VixDiskLibInfo", "uuid"),
        f.offsetof("VixDiskLibInfo", "logicalSectorSize"),
        f.offsetof("VixDiskLibBlockList", "blocks"),
        f.sizeof("VixDiskLibBlock"),
    ]
    assert ours == [layout(i) for i in range(len(ours))]
    assert stub is not None


def test_missing_libdir_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as ei:
        vddk.VddkLibrary.load(tmp_path / "nowhere")
    assert str(ei.value) == (
        f"VDDK not found in {tmp_path / 'nowhere'}: install the VMware VDDK and pass "
        "--vddk-libdir"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="VDDK not found in"):
        vddk.VddkLibrary.load(tmp_path / "empty")


def test_unloadable_library_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "libvixDiskLib.so.7").write_bytes(b"not an ELF file")
    r = _run_py(
        f"""
        from snapferry.engine.errors import SourceError
        from snapferry.native.vddk import VddkLibrary
        try:
            VddkLibrary.load({str(tmp_path)!r})
        except SourceError as e:
            print("ERR", e)
        """,
        {},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR VDDK in ") and "could not be loaded" in r.stdout


def test_info_reads_and_connect_params(
    vddk_libdir: Path, vddk_stub_env: StubEnv, disk: tuple[Path, bytes]
) -> None:
    _, data = disk
    lib = vddk.VddkLibrary.load(vddk_libdir)
    assert vddk.VddkLibrary.load(vddk_libdir) is lib  # once per process
    with _connect(lib, port=902, nfc_host_port=903) as conn, conn.open(
        "[datastore1] vm42/vm42.vmdk"
    ) as h:
        info = h.info()
        assert info.capacity_sectors == len(data) // 512
        assert info.size == len(data)
        assert info.logical_sector_size == 512
        assert h.transport_mode() == "nbdssl"
        # Whole disk in one call: split into <= 2 MiB VDDK reads (the stub refuses more).
        buf = bytearray(len(data))
        h.read_sectors(0, buf)
        assert bytes(buf) == data
        # Odd places, straight into a slice of a larger buffer.
        big = bytearray(3 * MiB)
        h.read_sectors(2049, memoryview(big)[512 : 512 + 2 * MiB + 1024])
        assert big[512 : 512 + 2 * MiB + 1024] == data[2049 * 512 : 2049 * 512 + 2 * MiB + 1024]
        assert big[:512] == bytes(512)
    reads = vddk_stub_env.events("read")
    assert reads and all(int(r[3].split("=")[1]) <= 4096 for r in reads)
    (connect,) = vddk_stub_env.events("connect")
    kv = dict(w.split("=", 1) for w in connect[2:])
    assert kv["vmx"] == "moref=vm-42"
    assert kv["server"] == "vcenter.test"
    assert kv["thumbprint"] == "AA:BB:CC"
    assert kv["user"] == "backup"
    assert (kv["port"], kv["nfc"]) == ("902", "903")
    assert kv["snapshot"] == "snapshot-7"
    assert kv["modes"] == "nbdssl:nbd"
    assert kv["ro"] == "1"
    assert "s3cret" not in vddk_stub_env.stats.read_text()
    assert [e[0] for e in vddk_stub_env.events() if e[0] in ("close", "disconnect")] == [
        "close",
        "disconnect",
    ]


def _holes_map(path: Path, chunk: int) -> list[tuple[int, int]]:
    """Allocated chunk runs (in bytes) computed independently with SEEK_DATA/HOLE."""
    size = path.stat().st_size // chunk * chunk
    alloc = [False] * (size // chunk)
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            for c in range(d // chunk, min(len(alloc), -(-h // chunk))):
                alloc[c] = True
            pos = h
    runs: list[tuple[int, int]] = []
    for i, a in enumerate(alloc):
        if a:
            if runs and runs[-1][0] + runs[-1][1] == i * chunk:
                runs[-1] = (runs[-1][0], runs[-1][1] + chunk)
            else:
                runs.append((i * chunk, chunk))
    return runs


def test_allocated_blocks_match_holes(
    vddk_libdir: Path, vddk_stub_env: StubEnv, disk: tuple[Path, bytes]
) -> None:
    path, _ = disk
    lib = vddk.VddkLibrary.load(vddk_libdir)
    assert lib.has_query_allocated_blocks
    with _connect(lib) as conn, conn.open("[datastore1] vm42/vm42.vmdk") as h:
        cap = h.info().capacity_sectors
        aligned = cap // 128 * 128
        blocks = h.allocated_blocks(0, aligned)
        with pytest.raises(ValueError):
            h.allocated_blocks(1, 128)
    got = [(s * 512, n * 512) for s, n in blocks]
    assert got == _holes_map(path, 64 * 1024)
    assert got[0] == (0, 64 * 1024)  # data at the very start


def test_allocated_blocks_query_is_split_at_the_chunk_limit(
    vddk_libdir: Path, vddk_stub_env: StubEnv
) -> None:
    # 40 GiB sparse disk: more than VIXDISKLIB_MAX_CHUNK_NUMBER (512 Ki) 64 KiB chunks.
    vddk_stub_env.make_image(
        "big.vmdk", 40 * 1024 * MiB, [(1 * MiB, 4096), (33 * 1024 * MiB, 70 * 1024)]
    )
    lib = vddk.VddkLibrary.load(vddk_libdir)
    with _connect(lib) as conn, conn.open("big.vmdk") as h:
        cap = h.info().capacity_sectors
        blocks = h.allocated_blocks(0, cap)
    assert [(s * 512, n * 512) for s, n in blocks] == [
        (1 * MiB, 64 * 1024),
        (33 * 1024 * MiB, 128 * 1024),
    ]
    qab = vddk_stub_env.events("qab")
    assert len(qab) == 2  # 32 GiB + 8 GiB


def test_injected_read_error_text_is_masked(
    vddk_libdir: Path, vddk_stub_env: StubEnv, disk: tuple[Path, bytes], monkeypatch: Any
) -> None:
    lib = vddk.VddkLibrary.load(vddk_libdir)
    monkeypatch.setenv("VDDK_STUB_FAIL_SECTOR", "3000")
    with _connect(lib) as conn, conn.open("[datastore1] vm42/vm42.vmdk") as h:
        h.read_sectors(0, bytearray(512))  # not covering sector 3000: fine
        with pytest.raises(vddk.VddkError) as ei:
            h.read_sectors(2048, bytearray(2 * MiB))
    e = ei.value
    assert isinstance(e, SourceError)
    assert e.code == 7 and e.raw > 0xFFFF and e.raw & 0xFFFF == 7
    assert str(e) == (
        "VDDK Read of [datastore1] vm42/vm42.vmdk at sector 2048 (+4096) failed: "
        "A file access error occurred on the host or guest operating system (VIX error 7)"
    )
    # The mask matters: the library has no text for the unmasked value.
    raw_text = lib.lib.VixDiskLib_GetErrorText(e.raw, vddk.ffi.NULL)
    try:
        assert vddk.ffi.string(raw_text).startswith(b"Unknown error")
    finally:
        lib.lib.VixDiskLib_FreeErrorText(raw_text)
    assert lib.error_text(e.raw) == lib.error_text(7)


@pytest.mark.parametrize(
    ("env", "kw", "expect"),
    [
        ({"VDDK_STUB_FAIL_CONNECT": "1"}, {}, "Insufficient permissions in the host"),
        ({"VDDK_STUB_PASSWORD": "right"}, {"password": "wrong"}, "(VIX error 3014)"),
        ({}, {"server": ""}, "One of the parameters was invalid (VIX error 3)"),
    ],
)
def test_connect_failures(
    vddk_libdir: Path,
    vddk_stub_env: StubEnv,
    monkeypatch: Any,
    env: dict[str, str],
    kw: dict[str, Any],
    expect: str,
) -> None:
    lib = vddk.VddkLibrary.load(vddk_libdir)
    for k, val in env.items():
        monkeypatch.setenv(k, val)
    with pytest.raises(SourceError) as ei:
        _connect(lib, **kw)
    assert str(ei.value).startswith("VDDK ConnectEx to ")
    assert expect in str(ei.value)
    assert "\n" not in str(ei.value)


def test_open_failures(vddk_libdir: Path, vddk_stub_env: StubEnv, monkeypatch: Any) -> None:
    lib = vddk.VddkLibrary.load(vddk_libdir)
    with _connect(lib) as conn:
        with pytest.raises(SourceError, match=r"Open of \[ds\] no.vmdk failed: The file was"):
            conn.open("[ds] no.vmdk")
        vddk_stub_env.make_image("x.vmdk", MiB, [])
        monkeypatch.setenv("VDDK_STUB_FAIL_OPEN", "1")
        with pytest.raises(SourceError, match=r"\(VIX error 4\)"):
            conn.open("x.vmdk")


# ---- process rules ------------------------------------------------------------


def _child_after_fork(libdir: str, q: Any) -> None:
    from snapferry.engine.sources.vddk import VddkConnectParams, VddkSource

    out: dict[str, Any] = {}
    params = VddkConnectParams(
        server="vc", user="u", password="p", vm_moref="vm-1", libdir=libdir
    )
    try:
        VddkSource.open(params, "d.vmdk")
        out["guard"] = "no error"
    except SourceError as e:
        out["guard"] = str(e)
    # Bypass our guard: the inherited library state itself must refuse (the stub
    # behaves like VDDK whose threads did not survive the fork).
    inst = vddk.VddkLibrary._instance
    assert inst is not None
    hp = vddk.ffi.new("VixDiskLibConnection *")
    out["raw_err"] = int(
        inst.lib.VixDiskLib_ConnectEx(vddk.ffi.NULL, b"\x01", vddk.ffi.NULL, vddk.ffi.NULL, hp)
    )
    q.put(out)


def test_fork_after_init_is_detected(
    vddk_libdir: Path, vddk_stub_env: StubEnv
) -> None:
    vddk_stub_env.make_image("d.vmdk", MiB, [(0, 4096)])
    vddk.VddkLibrary.load(vddk_libdir)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_after_fork, args=(str(vddk_libdir), q))
    p.start()
    try:
        out = q.get(timeout=60)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert "was forked from it" in out["guard"] and "'spawn'" in out["guard"]
    assert out["raw_err"] == 1  # VIX_E_FAIL from the library state inherited via fork


def test_initex_once_per_process_and_logging(
    vddk_libdir: Path, vddk_stub_env: StubEnv
) -> None:
    vddk_stub_env.make_image("d.vmdk", MiB, [(0, 4096)])
    code = f"""
        from snapferry.native.vddk import VddkLibrary
        lib = VddkLibrary.load({str(vddk_libdir)!r}, log_to_stderr=LOG)
        for _ in range(3):
            c = lib.connect(server="vc", vm_moref="vm-1", user="u", password="p")
            h = c.open("d.vmdk")
            h.read_sectors(0, bytearray(4096))
            h.close(); c.disconnect()
        assert VddkLibrary.load({str(vddk_libdir)!r}) is lib
        print("OK")
        """
    quiet = _run_py(code.replace("LOG", "False"), vddk_stub_env.env())
    assert quiet.returncode == 0 and quiet.stdout.strip() == "OK", quiet.stderr
    assert "vixDiskLibStub" not in quiet.stderr  # NULL callbacks: nothing from VDDK
    loud = _run_py(code.replace("LOG", "True"), vddk_stub_env.env())
    assert loud.returncode == 0, loud.stderr
    # VDDK's log lines (also from its background thread) reach stderr through libc.
    assert "vixDiskLibStub: InitEx(6.5)" in loud.stderr
    assert "background thread running" in loud.stderr
    pids = {quiet_or_loud[1] for quiet_or_loud in vddk_stub_env.events("init")}
    assert len(vddk_stub_env.events("init")) == 2 == len(pids)  # one per process
    assert vddk_stub_env.events("init-refused") == []
    assert len(vddk_stub_env.events("exit")) == 2  # Exit at interpreter shutdown
    assert len(vddk_stub_env.events("connect")) == 6


def test_library_without_query_allocated_blocks(
    vddk_libdir_noqab: Path, vddk_stub_env: StubEnv
) -> None:
    vddk_stub_env.make_image("d.vmdk", 2 * MiB, [(MiB, 4096)])
    r = _run_py(
        f"""
        import json
        from snapferry.engine.sources.vddk import VddkConnectParams, VddkSource
        p = VddkConnectParams(server="vc", user="u", password="p", vm_moref="vm-1",
                              libdir={str(vddk_libdir_noqab)!r})
        with VddkSource.open(p, "d.vmdk") as s:
            print(json.dumps([[e.offset, e.length, e.zero] for e in s.extents()]))
        """,
        vddk_stub_env.env(),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [[0, 2 * MiB, False]]


def test_reexec_puts_the_library_dir_on_ld_library_path(vddk_libdir: Path) -> None:
    code = f"""
        import os
        from snapferry.native.vddk import reexec_if_needed
        print("run", os.environ.get("LD_LIBRARY_PATH", ""), flush=True)
        reexec_if_needed({str(vddk_libdir)!r})
        print("kept")
        """
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH",)}
    env.pop("SNAPFERRY_VDDK_REEXEC", None)
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # First run: not on the path, re-executed; second run: on the path, carries on.
    assert lines == ["run ", f"run {vddk_libdir.resolve()}", "kept"]
