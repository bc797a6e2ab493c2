"""Build the stand-in libvixDiskLib (tests/vddk_stub/vixDiskLibStub.c) for tests.

``build_stub(cache_dir, qab=True)`` compiles the stub with gcc (once per source
version, cached under ``cache_dir``) and returns the directory to pass as VDDK libdir.
The pytest fixtures below cache it in pytest's cache directory:

* ``vddk_libdir``: the full stub (VDDK >= 6.7: with QueryAllocatedBlocks).
* ``vddk_libdir_noqab``: without QueryAllocatedBlocks/FreeBlockList (like VDDK 6.5).
* ``vddk_stub_env``: per-test disk directory and stats file, set in the environment
  the stub reads (``VDDK_STUB_DISKDIR``, ``VDDK_STUB_STATS``); returns a ``StubEnv``.

In-process, VDDK is loaded once per process (``snapferry.native.vddk.VddkLibrary``): every test
that loads it in the pytest process must use ``vddk_libdir``; tests of other variants
or of process rules run in subprocesses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STUB_SRC = Path(__file__).resolve().parent / "vddk_stub" / "vixDiskLibStub.c"
SONAME = "libvixDiskLib.so.8"


def build_stub(cache_dir: Path, *, qab: bool = True) -> Path:
    """Compile the stub into ``cache_dir/<hash>/`` (if not there yet); return that dir."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build the VDDK stand-in library")
    src = STUB_SRC.read_bytes()
    flags = ["-shared", "-fPIC", "-O2", "-pthread", "-Wall", "-fvisibility=hidden"]
    if not qab:
        flags.append("-DSTUB_NO_QAB")
    key = hashlib.sha256(src + " ".join(flags).encode()).hexdigest()[:16]
    libdir = cache_dir / f"{'full' if qab else 'noqab'}-{key}"
    lib = libdir / SONAME
    if lib.is_file():
        return libdir
    libdir.mkdir(parents=True, exist_ok=True)
    tmp = libdir / f".{SONAME}.{os.getpid()}.tmp"
    r = subprocess.run(
        [gcc, *flags, "-o", str(tmp), str(STUB_SRC)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"building the VDDK stub failed:\n{r.stderr}")
    os.replace(tmp, lib)  # atomic: parallel builders never see a half-written library
    return libdir


@dataclass
class StubEnv:
    diskdir: Path
    stats: Path

    def events(self, kind: str | None = None) -> list[list[str]]:
        """Stats lines split into words: ``[event, pid, k=v, ...]``."""
        if not self.stats.exists():
            return []
        rows = [line.split() for line in self.stats.read_text().splitlines() if line]
        return [r for r in rows if kind is None or r[0] == kind]

    def make_image(self, rel: str, size: int, data: list[tuple[int, int]], seed: int = 1) -> bytes:
        """``make_image`` at ``diskdir/rel`` (e.g. ``datastore1/vm/vm.vmdk``)."""
        return make_image(self.diskdir / rel, size, data, seed)

    def env(self) -> dict[str, str]:
        return {"VDDK_STUB_DISKDIR": str(self.diskdir), "VDDK_STUB_STATS": str(self.stats)}


def _cache_dir(request: pytest.FixtureRequest) -> Path:
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    if cache is not None:
        return Path(cache.mkdir("vddkstub"))
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    return factory.getbasetemp() / "vddkstub"


@pytest.fixture(scope="session")
def vddk_libdir(request: pytest.FixtureRequest) -> Path:
    return build_stub(_cache_dir(request))


@pytest.fixture(scope="session")
def vddk_libdir_noqab(request: pytest.FixtureRequest) -> Path:
    return build_stub(_cache_dir(request), qab=False)


@pytest.fixture
def vddk_stub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StubEnv]:
    diskdir = tmp_path / "datastores"
    diskdir.mkdir()
    env = StubEnv(diskdir=diskdir, stats=tmp_path / "vddk-stats.log")
    for k, val in env.env().items():
        monkeypatch.setenv(k, val)
    for k in (
        "VDDK_STUB_FAIL_READ",
        "VDDK_STUB_FAIL_SECTOR",
        "VDDK_STUB_FAIL_CONNECT",
        "VDDK_STUB_FAIL_OPEN",
        "VDDK_STUB_PASSWORD",
    ):
        monkeypatch.delenv(k, raising=False)
    yield env


def make_image(path: Path, size: int, data: list[tuple[int, int]], seed: int = 1) -> bytes:
    """A sparse file of ``size`` bytes with random bytes in the ``(offset, length)``
    ranges and holes elsewhere; returns the ``seed``-determined content written."""
    import random

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, ln in data:
            f.seek(off)
            f.write(rng.randbytes(ln))
    return path.read_bytes() if size <= 256 * 1024 * 1024 else b""
