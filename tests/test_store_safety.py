"""Issue-15 hard cases on the repository side: ids that collide under concurrency,
damaged copies that must not be reused, bad manifests, permissions, symlinks, bad
references, leftovers, chunk-size validation."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from store_helpers import backup_image, blob_location, make_mixed_image

from snapferry.engine.backup import BackupOptions, DiskInput, run_backup
from snapferry.engine.restore import restore
from snapferry.engine.sources.file import FileSource
from snapferry.engine.store import Repository
from snapferry.engine.verify import repo_info, verify_repo

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
CS = 64 << 10

# A weak id function for every process of the test (workers are spawned interpreters,
# so it goes in through sitecustomize): the id depends on the first 4 KiB only, so two
# chunks that share them collide.
WEAK_ID = textwrap.dedent(
    """
    import xxhash
    import snapferry.engine.store.hashing as h

    def weak(seed, data):
        return xxhash.xxh3_128_digest(bytes(memoryview(data).cast("B")[:4096]), seed)

    h.chunk_id = weak
    import snapferry.engine.store.blobs as b
    import snapferry.engine.store.repo as r
    b.chunk_id = weak
    r.chunk_id = weak
    """
)

COLLIDE = textwrap.dedent(
    """
    import sys
    from snapferry.engine.backup import BackupOptions, DiskInput, run_backup
    from snapferry.engine.errors import SnapferryError
    from snapferry.engine.sources.file import FileSource
    from snapferry.engine.store import Repository
    repo = Repository.open(sys.argv[1])
    try:
        r = run_backup(repo, sys.argv[3], [DiskInput("sda", FileSource(sys.argv[2]))],
                       BackupOptions(workers=int(sys.argv[4]), item_bytes=65536,
                                     no_parent=True), consistency="n/a")
        print("committed", r.backup_id)
    except SnapferryError as e:
        print("refused", e)
    """
)


@pytest.fixture
def weak_env(tmp_path: Path) -> dict[str, str]:
    d = tmp_path / "weak"
    d.mkdir()
    (d / "sitecustomize.py").write_text(WEAK_ID)
    env = cli_env()
    env["PYTHONPATH"] = str(d)
    return env


def _pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    head = os.urandom(4096)
    a = head + os.urandom(CS - 4096)
    b = head + os.urandom(CS - 4096)
    both = tmp_path / "both.img"
    both.write_bytes(a + b)
    one = tmp_path / "a.img"
    one.write_bytes(a)
    two = tmp_path / "b.img"
    two.write_bytes(b)
    return both, one, two


def test_two_workers_storing_a_colliding_pair_at_once_are_refused(
    tmp_path: Path, weak_env: dict[str, str]
) -> None:
    """Two workers of one backup each get one chunk of a colliding pair (both miss the
    index at the same moment and both store): the commit-time check refuses it."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    both, _a, _b = _pair(tmp_path)
    p = subprocess.run([sys.executable, "-c", COLLIDE, str(repo.path), str(both), "vm", "2"],
                       capture_output=True, text=True, cwd=ROOT, env=weak_env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("refused") and "alias" in p.stdout, p.stdout
    assert repo.list_backups() == []


def test_two_backups_storing_a_colliding_pair_at_once(
    tmp_path: Path, weak_env: dict[str, str]
) -> None:
    """Two backup processes at once, one chunk each, colliding: at most one commits, and
    whatever committed restores right (checked with the weak id in force)."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    _both, a, b = _pair(tmp_path)
    procs = [
        subprocess.Popen([sys.executable, "-c", COLLIDE, str(repo.path), str(img), vm, "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=weak_env)
        for img, vm in ((a, "va"), (b, "vb"))
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    lines = [o[0].strip() for o in outs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    committed = [ln for ln in lines if ln.startswith("committed")]
    print(lines)
    assert len(committed) <= 1, lines
    check = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from snapferry.engine.restore import restore
        from snapferry.engine.store import Repository
        repo = Repository.open(sys.argv[1])
        for m in repo.list_backups():
            out = Path(sys.argv[2]) / (m.vm + ".out")
            restore(repo, m.backup_id, to=out)
            src = Path(sys.argv[2]) / ("a.img" if m.vm == "va" else "b.img")
            print(m.vm, out.read_bytes() == src.read_bytes())
        """
    )
    p = subprocess.run([sys.executable, "-c", check, str(repo.path), str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=weak_env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert all(ln.endswith("True") for ln in p.stdout.split("\n") if ln), p.stdout
    assert len([ln for ln in p.stdout.split("\n") if ln]) == len(committed)


def test_damaged_copy_is_not_reused_and_the_next_backup_repairs_it(tmp_path: Path) -> None:
    """A chunk's stored bytes altered in place (a raw blob, so it still 'decodes'):
    verify --read-data finds it, records it as damaged; the next backup of the same
    data stores a fresh copy that readers use; verify is clean again."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(8 * CS))  # incompressible: raw blobs
    m1 = backup_image(repo, {"sda": img})
    idx = repo.load_index(m1.backup_id, "sda")
    victim = idx.get(3)
    path, off, _n = blob_location(repo, victim)
    raw = bytearray(path.read_bytes())
    raw[off + 100 : off + 108] = b"ALTERED!"
    path.write_bytes(bytes(raw))
    rep = verify_repo(repo, None, read_data=True)
    assert not rep.ok and [b.id for b in rep.bad_chunks] == [victim.hex()]
    assert rep.damaged_recorded == 1 and len(list((repo.path / "damaged").iterdir())) == 1
    m2 = backup_image(repo, {"sda": img})
    assert m2.disks[0].chunks_new == 1 and m2.disks[0].chunks_reused == 7
    assert len(repo.chunk_index().candidates(victim)) == 2
    for bid in (m1.backup_id, m2.backup_id):
        out = tmp_path / f"{bid}.raw"
        restore(repo, bid, to=out)
        assert out.read_bytes() == img.read_bytes()
    after = verify_repo(repo, None, read_data=True)
    assert after.ok, after.problems
    assert any("superseded" in n for n in after.notes)


def test_bad_manifest_never_blocks_list_info_backup(tmp_path: Path) -> None:
    rp = tmp_path / "repo"
    assert run_cli("init", rp, "--chunk-size", "64K").returncode == 0
    img = tmp_path / "d.img"
    make_mixed_image(img, 2 * MiB)
    assert run_cli("backup", img, "--repo", rp, "--name", "vm").returncode == 0
    snaps = rp / "snapshots"
    good = next(snaps.iterdir())
    (snaps / "20990101T000000Z-00000001").write_text("{not json")
    d = json.loads(good.read_text())
    d["backup_id"] = "20990101T000000Z-00000002"
    d["disks"][0]["chunks"] = "many"
    (snaps / "20990101T000000Z-00000002").write_text(json.dumps(d))
    for args in (("list",), ("info",), ("backup", img, "--name", "vm")):
        p = run_cli(*args, "--repo", rp)
        assert p.returncode == 0, (args, p.stderr)
    p = run_cli("list", "--repo", rp, "--json")
    assert len(json.loads(p.stdout)["backups"]) == 2
    p = run_cli("verify", "--repo", rp)
    assert p.returncode not in (0, 70) and p.stderr.count("\n") == 1, p.stderr
    assert "20990101T000000Z-00000001" in p.stderr and "20990101T000000Z-00000002" in p.stderr
    p = run_cli("restore", "20990101T000000Z-00000002", "--repo", rp, "--to", tmp_path / "x")
    assert p.returncode not in (0, 70) and "invalid manifest" in p.stderr, p.stderr


def test_repository_is_private_whatever_the_umask(tmp_path: Path) -> None:
    rp = tmp_path / "repo"
    env = cli_env()
    script = "import os, sys; os.umask(0o022); from snapferry.cli.main import main; " \
             "sys.exit(main(sys.argv[1:]))"
    img = tmp_path / "d.img"
    make_mixed_image(img, 2 * MiB)
    for args in (["init", str(rp)], ["backup", str(img), "--repo", str(rp)]):
        p = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    seen = 0
    for dirpath, _dirs, files in os.walk(rp):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for f in files:
            assert stat.S_IMODE(os.stat(Path(dirpath) / f).st_mode) == 0o600, f
            seen += 1
    assert seen >= 4


@pytest.mark.parametrize("planted", ["snapshots", "locks", "data", "index"])
def test_symlinks_inside_the_repository_are_refused(tmp_path: Path, planted: str) -> None:
    rp = tmp_path / "repo"
    assert run_cli("init", rp, "--chunk-size", "64K").returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = rp / planted
    if target.exists():
        target.rmdir()
    target.symlink_to(elsewhere)
    img = tmp_path / "d.img"
    make_mixed_image(img, 2 * MiB)
    p = run_cli("backup", img, "--repo", rp)
    assert p.returncode not in (0, 70), p.stderr
    assert "symbolic link" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert list(elsewhere.iterdir()) == [], "nothing written through the link"


def test_leftovers_are_reported_by_verify_and_info(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    img = tmp_path / "d.img"
    make_mixed_image(img, 2 * MiB)
    backup_image(repo, {"sda": img})
    w = repo.writer_spec().open()  # an interrupted writer: pack + index, no manifest
    from snapferry.engine.store.hashing import chunk_id, strong_digest

    data = os.urandom(CS)
    w.store(chunk_id(repo.seed, data), data, strong_digest(data))
    w.flush()
    (repo.path / "data" / ".tmp-x-1-2").write_bytes(b"partial")
    rep = verify_repo(repo)
    assert rep.ok
    left = rep.leftovers
    assert left.packs == 1 and left.pack_bytes > CS and left.index_files == 1
    assert left.temp_files == 1 and left.temp_bytes == 7
    assert any("no restore point uses" in n for n in rep.notes)
    assert repo_info(repo)["leftovers"] == left.to_json()


def test_chunk_size_zero_and_4096_refused_by_init(tmp_path: Path) -> None:
    for size in ("0", "4096", "3M"):
        p = run_cli("init", tmp_path / f"r{size}", "--chunk-size", size)
        assert p.returncode == 2 and "power of two" in p.stderr, p.stderr


def test_backup_into_a_repository_with_a_full_collision_check(tmp_path: Path) -> None:
    """No weak ids: a real backup with 2 workers over duplicated data commits (equal
    digests are not a collision)."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    block = os.urandom(CS)
    img = tmp_path / "dup.img"
    img.write_bytes(block * 32)
    res = run_backup(repo, "vm", [DiskInput("sda", FileSource(img))],
                     BackupOptions(workers=2, item_bytes=CS), consistency="n/a")
    assert res.disks[0].chunks_new + res.disks[0].chunks_reused == 32
    out = tmp_path / "o.raw"
    restore(repo, res.backup_id, to=out)
    assert out.read_bytes() == img.read_bytes()
