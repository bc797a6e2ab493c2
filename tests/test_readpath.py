"""The one read path of restore points (``RestorePointSource``): restore is a copy from
it, serve reads it at random. Byte identity (plain, encrypted, sparse, incremental
chains, several disks), damage named clearly, memory bounded on a sparse 4 TiB point,
unaligned random and interleaved sequential reads."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import cli_env, snapferry_exe
from servecli import serve_missing
from store_helpers import backup_image, chunks_of, flip_blob, make_mixed_image, overwrite_random

from snapferry.engine.errors import CorruptionError
from snapferry.engine.restore import restore
from snapferry.engine.sources.restore_point import RestorePointSource
from snapferry.engine.store import Repository
from snapferry.engine.store.hashing import NULL_ID, chunk_id, strong_digest
from snapferry.engine.store.index import DiskIndex
from snapferry.engine.store.manifest import DiskEntry, Manifest

MiB = 1 << 20
PASS = "correct horse readpath"


@pytest.fixture(params=["plain", "encrypted"])
def repo(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
         ) -> Repository:
    monkeypatch.setenv("SNAPFERRY_TEST_SCRYPT_N", "1024")
    if request.param == "plain":
        return Repository.init(tmp_path / "repo", chunk_size=64 << 10)
    return Repository.init(tmp_path / "repo", chunk_size=64 << 10, encryption="repokey",
                           passphrase=PASS)


def _allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def test_restore_and_reads_are_byte_identical_and_sparse(repo: Repository, tmp_path: Path
                                                         ) -> None:
    img = tmp_path / "d.img"
    make_mixed_image(img, 9 * MiB + 4321, seed=11)
    want = img.read_bytes()
    m = backup_image(repo, {"sda": img})
    out = tmp_path / "out.raw"
    res = restore(repo, m.backup_id, to=out, workers=3)
    assert out.read_bytes() == want
    idx = repo.load_index(m.backup_id, "sda")
    assert idx.zero_count() > 0
    assert _allocated(out) <= idx.nonzero_count() * repo.chunk_size + (64 << 10)
    assert res.bytes_written == sum(idx.length(i) for i in range(len(idx))
                                    if idx.get(i) != NULL_ID)
    with RestorePointSource(repo.load_index(m.backup_id, "sda", reader=repo.reader()),
                            repo.reader(), cache_bytes=256 << 10) as src:
        rng = random.Random(5)
        for _ in range(200):  # unaligned offsets and lengths, across chunks
            off = rng.randrange(len(want))
            n = min(rng.randrange(1, 5 * repo.chunk_size), len(want) - off)
            buf = bytearray(n)
            src.readinto(memoryview(buf), off)
            assert buf == want[off : off + n], (off, n)
        assert src.cached_bytes <= 256 << 10, "the cache is bounded in bytes"


def test_incremental_chain_points_each_restore_whole(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    make_mixed_image(img, 6 * MiB, seed=2)
    states = [img.read_bytes()]
    points = [backup_image(repo, {"sda": img})]
    for k in range(3):  # full <- inc1 <- inc2 <- inc3, each on its parent
        offs = overwrite_random(img, 8, seed=20 + k)
        changed = chunks_of(offs, 64 << 10, repo.chunk_size)
        points.append(backup_image(repo, {"sda": img}, parent=points[-1],
                                   changed={"sda": changed}))
        states.append(img.read_bytes())
    assert points[-1].parent == points[-2].backup_id
    for i, (m, want) in enumerate(zip(points, states, strict=True)):
        out = tmp_path / f"p{i}.raw"
        restore(repo, m.backup_id, to=out, workers=2)
        assert out.read_bytes() == want, f"restore point {i}"
        with RestorePointSource.open(repo, m.backup_id) as src:
            buf = bytearray(len(want))
            src.readinto(memoryview(buf), 0)
            assert buf == want


def test_several_disks(repo: Repository, tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_mixed_image(a, 3 * MiB + 5, seed=3)
    make_mixed_image(b, 5 * MiB, seed=4)
    m = backup_image(repo, {"vda": a, "vdb": b})
    for disk, img in (("vda", a), ("vdb", b)):
        out = tmp_path / f"{disk}.raw"
        restore(repo, m.backup_id, to=out, disk=disk)
        assert out.read_bytes() == img.read_bytes()
        with RestorePointSource.open(repo, m.backup_id, disk) as src:
            assert src.size == img.stat().st_size


def test_corrupt_chunk_is_named_by_restore_and_reads(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(random.Random(8).randbytes(20 * (64 << 10)))  # adjacent blobs: one run
    m = backup_image(repo, {"sda": img})
    idx = repo.load_index(m.backup_id, "sda")
    victim = idx.get(9)
    flip_blob(repo, victim)
    with pytest.raises(CorruptionError, match=rf"chunk #9 \(offset {9 * (64 << 10)}, "
                                              rf"id {victim.hex()}\)"):
        restore(repo, m.backup_id, to=tmp_path / "bad.raw")
    assert not (tmp_path / "bad.raw").exists()
    want = img.read_bytes()
    with RestorePointSource.open(repo, m.backup_id) as src:
        with pytest.raises(CorruptionError, match=victim.hex()):
            src.readinto(memoryview(bytearray(100)), 9 * (64 << 10) + 7)
        buf = bytearray(9 * (64 << 10))  # the rest of the same run still reads
        src.readinto(memoryview(buf), 0)
        assert buf == want[: len(buf)]


def test_interleaved_sequential_readers_are_read_ahead(repo: Repository, tmp_path: Path
                                                       ) -> None:
    """Four threads, each reading its own quarter in order (nbdcopy's connections):
    every stream is followed, so almost every chunk comes from read-ahead."""
    img = tmp_path / "d.img"
    img.write_bytes(random.Random(1).randbytes(16 * MiB))
    m = backup_image(repo, {"sda": img})
    want = img.read_bytes()
    errors: list[int] = []
    with RestorePointSource.open(repo, m.backup_id, readahead_bytes=1 * MiB) as src:

        def stream(q: int) -> None:
            buf = bytearray(96 << 10)  # not a chunk multiple: reads straddle chunks
            lo, hi = q * 4 * MiB, (q + 1) * 4 * MiB
            for off in range(lo, hi, len(buf)):
                n = min(len(buf), hi - off)
                src.readinto(memoryview(buf)[:n], off)
                if buf[:n] != want[off : off + n]:
                    errors.append(off)

        ts = [threading.Thread(target=stream, args=(q,)) for q in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert errors == []
        assert src.chunk_reads == 256
        assert src.foreground_loads <= 4 * 3, src.foreground_loads  # stream starts only


def _sparse_point(repo: Repository, size: int, data: dict[int, bytes]) -> Manifest:
    """A restore point of a ``size``-byte disk holding ``data`` (chunk number -> bytes)
    and zeros elsewhere, written without reading a disk."""
    cs = repo.chunk_size
    with repo.lock():
        known = repo.index_names()
        writer = repo.writer_spec().open()
        idx = DiskIndex.empty(size, cs, page_entries=repo.page_entries)
        for i, blob in data.items():
            cid = chunk_id(repo.seed, blob)
            writer.store(cid, blob, strong_digest(blob))
            idx.set(i, cid)
        written = writer.flush()
        writer.close()
        entry = DiskEntry(name="big", virtual_size=size, source={"kind": "test"})
        m = Manifest(backup_id=repo.new_backup_id(), vm="big", chunk_size=cs, mode="full",
                     parent=None, consistency="n/a", disks=[entry])
        repo.commit_restore_point(m, {"big": idx}, written=written, known_at_start=known)
    return m


_MEASURE = """
import json, sys
from pathlib import Path
from snapferry.engine.restore import restore
from snapferry.engine.sources.restore_point import RestorePointSource
from snapferry.engine.store import Repository
repo = Repository.open(sys.argv[1])
bid, out = sys.argv[2], Path(sys.argv[3])
res = restore(repo, bid, to=out, workers=2)
with RestorePointSource.open(repo, bid) as src:
    zero = sum(e.length for e in src.extents() if e.zero)
    got = []
    for off in json.loads(sys.argv[4]):
        b = bytearray(300)
        src.readinto(memoryview(b), off)
        got.append(bytes(b).hex())
# VmHWM: this process's own peak (ru_maxrss would also count the pytest process this
# one was forked from: Linux keeps the pre-exec peak)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
           if line.startswith("VmHWM:"))
print(json.dumps({"rss_kib": hwm,
                  "written": res.bytes_written, "zero": zero, "got": got}))
"""


def test_sparse_4tib_point_restores_and_reads_in_bounded_memory(tmp_path: Path) -> None:
    """32 Mi chunks of 128 KiB: a whole-disk id array alone would be 512 MiB."""
    size = 4 << 40
    repo = Repository.init(tmp_path / "repo")  # default 128 KiB chunks
    cs = repo.chunk_size
    rng = random.Random(3)
    where = [0, 1, 4095, 4096, (size // cs) // 2, size // cs - 1]
    data = {i: rng.randbytes(cs) for i in where}
    m = _sparse_point(repo, size, data)
    out = tmp_path / "big.raw"
    probes = [i * cs + 1000 for i in where] + [7 * cs]
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(repo.path), m.backup_id, str(out),
                        json.dumps(probes)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    try:
        assert os.stat(out).st_size == size
        assert _allocated(out) < 16 * MiB, "holes stay holes"
        with open(out, "rb") as f:
            for i, blob in data.items():
                f.seek(i * cs)
                assert f.read(cs) == blob
    finally:
        out.unlink(missing_ok=True)
    assert doc["written"] == len(where) * cs
    assert doc["zero"] == size - len(where) * cs
    want = [data[i][1000:1300].hex() for i in where] + [bytes(300).hex()]
    assert doc["got"] == want
    assert doc["rss_kib"] < 200 * 1024, f"peak RSS {doc['rss_kib']} KiB"


@pytest.mark.skipif(serve_missing() is not None, reason=str(serve_missing()))
def test_serve_of_an_encrypted_point_reads_back_identical(tmp_path: Path) -> None:
    """nbdkit's embedded Python may import an older cryptography (Debian's) that takes
    bytes only: the export of an encrypted repository must still read."""
    env = cli_env(SNAPFERRY_PASSWORD=PASS, SNAPFERRY_TEST_SCRYPT_N="1024")
    repo = Repository.init(tmp_path / "repo", chunk_size=64 << 10, encryption="repokey",
                           passphrase=PASS)
    img = tmp_path / "d.img"
    make_mixed_image(img, 5 * MiB + 512, seed=6)
    m = backup_image(repo, {"sda": img})
    short_dir = Path(tempfile.mkdtemp(prefix="sfrp-"))  # unix socket paths are short
    proc = subprocess.Popen(
        [*snapferry_exe(), "serve", m.backup_id, "--repo", str(repo.path), "--socket",
         str(short_dir / "s.sock"), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=30)[1]
        uri = json.loads(line)["uri"]
        out = tmp_path / "copy.raw"
        r = subprocess.run(["nbdcopy", "-C", "4", uri, str(out)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == img.read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        shutil.rmtree(short_dir, ignore_errors=True)
    assert proc.returncode == 0, err
