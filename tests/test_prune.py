"""prune: leftovers of killed backups, locks and stale locks, a real concurrent
backup+prune run, and a SIGKILL of a real prune process at every step."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prune_helpers import evolve, point_at, read_data_ok, restores_identical

from snapferry.engine.errors import RepositoryError
from snapferry.engine.forget import forget
from snapferry.engine.progress import NullProgress
from snapferry.engine.restore import restore
from snapferry.engine.retention import Policy
from snapferry.engine.store import Repository
from snapferry.engine.store.prune import STEPS, exclusive, prune
from snapferry.engine.verify import verify_repo

CS = 64 << 10
T0 = datetime(2026, 2, 1, 4, tzinfo=UTC)


def _build(tmp: Path, points: int = 8, size: int = 24) -> tuple[Repository, dict[str, bytes]]:
    repo = Repository.init(tmp / "repo", chunk_size=CS, pack_size=1 << 20)
    img = tmp / "disk.img"
    rng = random.Random(7)
    img.write_bytes(rng.randbytes(size * CS))
    content = {}
    for k in range(points):
        m = point_at(repo, img, T0 + timedelta(days=k))
        content[m.backup_id] = img.read_bytes()
        evolve(img, rng, 5, CS)
    return repo, content


def _all_restore(repo: Repository, content: dict[str, bytes], tmp: Path) -> None:
    live = {m.backup_id for m in repo.list_backups()}
    assert live
    for bid in live:
        assert restores_identical(repo, bid, content[bid], tmp), bid
    assert read_data_ok(repo) == []


KILLED_BACKUP = textwrap.dedent("""
    import os, signal, sys
    from snapferry.engine.store import Repository, chunk_id, strong_digest
    repo = Repository.open(sys.argv[1])
    data = open(sys.argv[2], "rb").read()
    with repo.lock():
        w = repo.writer_spec().open()
        for i in range(0, len(data), repo.chunk_size):
            c = data[i:i + repo.chunk_size]
            w.store(chunk_id(repo.seed, c), c, strong_digest(c))
        w.flush()
        d = repo.path / "data" / "ab"
        d.mkdir(exist_ok=True)
        (d / f".tmp-{'ab' * 20}-{os.getpid()}-0badf00d").write_bytes(b"x" * 5000)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_prune_reclaims_what_killed_backups_leave(tmp_path: Path) -> None:
    repo, content = _build(tmp_path, points=2)
    clean = prune(repo, max_unused=0)
    size0 = clean.bytes_after
    junk = tmp_path / "junk.img"
    junk.write_bytes(random.Random(99).randbytes(40 * CS))
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", KILLED_BACKUP, str(repo.path), str(junk)],
                           capture_output=True, timeout=120)
        assert r.returncode == -9, r.stderr
    left = verify_repo(repo).leftovers
    assert left.packs >= 2 and left.temp_files == 2
    assert any(n.startswith("shared-") for n in os.listdir(repo.path / "locks"))
    rep = prune(repo)  # the dead backups' shared locks are stale: removed
    assert rep.temp_files_removed == 2 and rep.packs_deleted >= 2 and not rep.problems
    assert rep.bytes_freed >= 40 * CS  # the second killed run dedups against the first
    assert rep.bytes_after <= size0 + 4096
    left = verify_repo(repo).leftovers
    assert (left.packs, left.index_files, left.temp_files) == (0, 0, 0)
    assert os.listdir(repo.path / "locks") == []
    _all_restore(repo, content, tmp_path)


def test_prune_and_backups_exclude_each_other_and_stale_locks(tmp_path: Path) -> None:
    repo, content = _build(tmp_path, points=3)
    with repo.lock("backup"), pytest.raises(RepositoryError, match="locked by backup"):
        prune(repo)  # a running backup blocks prune
    with exclusive(repo, "prune"), pytest.raises(RepositoryError, match="locked by prune"):
        point_at(repo, tmp_path / "disk.img", T0 + timedelta(days=30))
    # a lock of a dead process on this host is stale: prune removes it and runs
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock = {"role": "shared", "pid": int(dead.stdout), "pid_start": "1", "host":
            socket.gethostname(), "purpose": "backup", "since": "2026-01-01T00:00:00Z",
            "token": "00"}
    repo.backend.save("locks", "shared-00000000000000aa", json.dumps(lock).encode())
    prune(repo)
    assert repo.backend.stat("locks", "shared-00000000000000aa") is None
    # another host's lock younger than 24 h is live: prune stops, naming it
    lock.update(host="elsewhere.invalid",
                since=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    repo.backend.save("locks", "shared-00000000000000bb", json.dumps(lock).encode())
    with pytest.raises(RepositoryError, match="shared-00000000000000bb"):
        prune(repo)
    lock.update(since=(datetime.now(UTC) - timedelta(hours=25)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    repo.backend.remove("locks", "shared-00000000000000bb")
    repo.backend.save("locks", "shared-00000000000000cc", json.dumps(lock).encode())
    prune(repo)
    assert os.listdir(repo.path / "locks") == []
    _all_restore(repo, content, tmp_path)


PRUNE_LOOP = textwrap.dedent("""
    import sys, time
    from snapferry.engine.errors import RepositoryError
    from snapferry.engine.store import Repository
    from snapferry.engine.forget import forget
    from snapferry.engine.retention import Policy
    repo = Repository.open(sys.argv[1])
    ran = refused = 0
    deadline = time.monotonic() + 60
    while ran < 6 and time.monotonic() < deadline:
        try:
            forget(repo, policy=Policy(last=3), then_prune=True, max_unused=0)
            ran += 1
        except RepositoryError as e:
            if "locked" not in str(e):
                raise
            refused += 1
        time.sleep(0.01)
    print(ran, refused)
""")


def test_concurrent_backups_and_prunes_never_lose_a_committed_point(tmp_path: Path) -> None:
    repo, _content = _build(tmp_path, points=2)
    img = tmp_path / "disk.img"
    rng = random.Random(5)
    proc = subprocess.Popen([sys.executable, "-c", PRUNE_LOOP, str(repo.path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    content: dict[str, bytes] = {}
    committed = refused = 0
    k = 0
    try:
        while proc.poll() is None and committed < 40:
            k += 1
            try:
                m = point_at(repo, img, T0 + timedelta(days=10, hours=k))
                content[m.backup_id] = img.read_bytes()
                committed += 1
            except RepositoryError as e:
                assert "locked" in str(e), e
                refused += 1
            evolve(img, rng, 3, CS)
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    ran, _pr = (int(x) for x in out.split())
    assert ran >= 1 and committed >= 3
    forget(repo, policy=Policy(last=3), then_prune=True, max_unused=0)
    live = {m.backup_id for m in repo.list_backups()}
    assert live <= set(content) | set(_content)
    newest = sorted(content)[-3:]
    assert set(newest) <= live  # the last three committed points survive every prune
    for bid in newest:
        assert restores_identical(repo, bid, content[bid], tmp_path), bid
    assert read_data_ok(repo) == []


def _run_prune(repo: Path, kill: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SNAPFERRY_FAULT", None)
    if kill:
        env["SNAPFERRY_FAULT"] = f"prune-kill={kill}"
    return subprocess.run(
        [sys.executable, "-m", "snapferry", "forget", "--keep-last", "3", "--prune",
         "--max-unused", "0", "--repo", str(repo)],
        capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("tmpl")
    repo, content = _build(tmp, points=8, size=40)
    return repo.path, content


KILLS = [*STEPS, "repack:2", "unindex:2", "delete:3"]


@pytest.mark.parametrize("step", KILLS)
def test_prune_killed_at_every_step(
    step: str, template: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    src, content = template
    rp = tmp_path / "repo"
    shutil.copytree(src, rp)
    r = _run_prune(rp, step)
    assert r.returncode == -9, f"step {step} not reached: {r.stdout} {r.stderr}"
    repo = Repository.open(rp)
    _all_restore(repo, content, tmp_path)  # every kept (and not yet removed) point
    r = _run_prune(rp, None)
    assert r.returncode == 0, r.stderr
    repo = Repository.open(rp)
    assert len(repo.list_backups()) == 3
    _all_restore(repo, content, tmp_path)
    again = prune(repo, max_unused=0, dry_run=True)
    assert (again.packs_deleted, again.packs_repacked, again.unreferenced_bytes_before) == (
        0, 0, 0), again
    left = verify_repo(repo).leftovers
    assert (left.packs, left.index_files, left.temp_files) == (0, 0, 0)
    assert os.listdir(rp / "locks") == []


def test_verify_reports_unreferenced_space_and_index_pack_disagreement(tmp_path: Path) -> None:
    from snapferry.engine.store.blobs import ENTRY_DTYPE
    from snapferry.engine.store.pack import encode_index_file, read_pack_trailer

    repo, content = _build(tmp_path, points=4)
    forget(repo, policy=Policy(last=2))
    rep = verify_repo(repo)
    assert rep.ok and any("no restore point uses" in n for n in rep.notes), rep.notes
    pack = next(iter(i.name for i in repo.backend.objects("data")))
    entries = read_pack_trailer(repo.backend, pack).copy()
    wrong = np.array(entries[:1], dtype=ENTRY_DTYPE)
    wrong["offset"] = wrong["offset"] + 1  # an index file that lies about the pack
    name, blob = encode_index_file([(bytes.fromhex(pack), wrong.tobytes())])
    repo.backend.save("index", name, blob)
    rep = verify_repo(repo)
    assert any(pack[:16] in p and "disagrees" in p for p in rep.problems), rep.problems
    pr = prune(repo, max_unused=0)  # the lying entry is ignored and dropped
    assert any("trailer does not list" in p for p in pr.problems), pr.problems
    assert repo.backend.stat("index", name) is None
    rep = verify_repo(repo)
    assert rep.ok and not any("no restore point uses" in n for n in rep.notes), rep.notes
    _all_restore(repo, content, tmp_path)


def test_real_backup_killed_mid_copy_is_reclaimed_by_prune(tmp_path: Path) -> None:
    """Issue 15, item 9: `snapferry backup` (with its worker processes) SIGKILLed while
    it writes packs; `snapferry prune` then removes every byte it left."""
    import signal
    import time

    from conftest import run_cli
    from store_helpers import all_packs

    rp = tmp_path / "repo"
    assert run_cli("init", rp, "--chunk-size", "64K").returncode == 0
    small = tmp_path / "small.img"
    small.write_bytes(random.Random(1).randbytes(2 << 20))
    assert run_cli("backup", small, "--repo", rp, "--name", "keep").returncode == 0
    assert run_cli("prune", "--repo", rp).returncode == 0
    repo = Repository.open(rp)
    packs_before = sorted(p.name for p in all_packs(repo))
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        rng = random.Random(2)
        for _ in range(96):
            f.write(rng.randbytes(1 << 20))
    p = subprocess.Popen([sys.executable, "-m", "snapferry", "backup", str(big), "--repo",
                          str(rp), "--name", "vm", "--workers", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while (time.monotonic() < deadline and len(all_packs(repo)) < len(packs_before) + 1
           and p.poll() is None):
        time.sleep(0.02)
    assert p.poll() is None, "the backup ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    for _ in range(500):  # the workers die with the group (prune spares live writers)
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    assert [m.vm for m in repo.list_backups()] == ["keep"]
    left = verify_repo(repo).leftovers
    assert left.pack_bytes + left.temp_bytes >= 1 << 20  # packs and/or half-written ones
    r = run_cli("prune", "--repo", rp, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["bytes_freed"] >= left.pack_bytes + left.temp_bytes
    assert doc["temp_files_removed"] == left.temp_files
    assert sorted(p.name for p in all_packs(repo)) == packs_before
    left = verify_repo(repo).leftovers
    assert (left.packs, left.index_files, left.temp_files) == (0, 0, 0)
    assert os.listdir(rp / "locks") == []
    out = tmp_path / "out.raw"
    bid = repo.list_backups()[0].backup_id
    assert run_cli("restore", bid, "--repo", rp, "--to", out).returncode == 0
    assert out.read_bytes() == small.read_bytes()


def test_a_lost_index_file_costs_no_data(tmp_path: Path) -> None:
    """A pack whose index file is gone but that holds needed blobs is re-indexed from
    its own trailer, never deleted."""
    from snapferry.engine.store.pack import decode_index_file

    repo, content = _build(tmp_path, points=3)
    names = [i.name for i in repo.backend.objects("index")]
    victim = max(names, key=lambda n: sum(
        len(e) for _p, e in decode_index_file(n, repo.backend.load("index", n))))
    repo.backend.remove("index", victim)
    assert not verify_repo(repo).ok  # blobs now missing from the index
    rep = prune(repo)
    assert rep.packs_reindexed >= 1 and rep.packs_deleted == 0, rep
    _all_restore(repo, content, tmp_path)


def test_after_a_kill_past_repacking_the_next_prune_copies_nothing_again(
    template: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    src, content = template
    rp = tmp_path / "repo"
    shutil.copytree(src, rp)
    assert _run_prune(rp, "repacked").returncode == -9
    repo = Repository.open(rp)
    rep = prune(repo, max_unused=0)
    # the new packs hold only needed blobs: their copies are kept, the old packs emptied
    assert rep.blobs_copied == 0 and rep.packs_deleted > 0, rep
    _all_restore(repo, content, tmp_path)


class _LocksSeen(NullProgress):
    """Records the lock objects present each time the restore reports progress."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: list[list[str]] = []
        self.held: list[dict[str, object]] = []

    def advance(self, n: int) -> None:
        names = sorted(os.listdir(self.root / "locks"))
        self.seen.append(names)
        self.held += [json.loads((self.root / "locks" / n).read_bytes()) for n in names]


def test_restore_and_verify_hold_the_shared_role(tmp_path: Path) -> None:
    """FORMAT.md D8: a reader holds the shared role, so prune cannot delete beneath it,
    and a reader refuses at its start while a prune holds the exclusive role."""
    repo, content = _build(tmp_path, points=2)
    bid = sorted(content)[-1]
    watch = _LocksSeen(repo.path)
    out = tmp_path / "r.raw"
    res = restore(repo, bid, to=out, progress=watch)
    assert out.read_bytes() == content[bid] and res.warnings == []
    assert watch.seen and all(len(s) == 1 and s[0].startswith("shared-") for s in watch.seen)
    assert {(h["purpose"], h["pid"], h["role"]) for h in watch.held} == {
        ("restore", os.getpid(), "shared")}
    assert os.listdir(repo.path / "locks") == []  # given back
    out.unlink()

    with repo.reading("restore", print), pytest.raises(RepositoryError, match="locked by restore"):
        prune(repo)
    with exclusive(repo, "prune"):
        for run in (lambda: restore(repo, bid, to=out), lambda: verify_repo(repo)):
            with pytest.raises(RepositoryError, match="locked by prune"):
                run()
        assert sorted(os.listdir(tmp_path)) == ["disk.img", "repo"]  # no temp file left
    assert os.listdir(repo.path / "locks") == []
    assert verify_repo(repo, read_data=True).ok


READ_ONLY_READ = textwrap.dedent("""
    import json, sys
    from snapferry.engine.errors import RepositoryError
    from snapferry.engine.restore import restore
    from snapferry.engine.store import Repository
    from snapferry.engine.verify import verify_repo
    repo = Repository.open(sys.argv[1])
    try:
        res = restore(repo, sys.argv[2], to=sys.argv[3])
        rep = verify_repo(repo, read_data=True)
        print(json.dumps({"warnings": res.warnings, "ok": rep.ok, "notes": rep.notes}))
    except RepositoryError as e:
        print(json.dumps({"error": str(e)}))
""")


def _read_only_read(repo: Path, bid: str, out: Path) -> dict[str, object]:
    """Restore and verify through a read-only bind mount of ``repo``, made in a private
    mount namespace (``unshare -m``): it goes away with the process, whatever happens."""
    ro = out.parent / "ro"
    ro.mkdir(exist_ok=True)
    script = (f'mount --bind "{repo}" "{ro}" && mount -o remount,bind,ro "{ro}" && '
              f'exec "{sys.executable}" -c "$0" "{ro}" {bid} "{out}"')
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                        READ_ONLY_READ], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "mount" in r.stderr:
        pytest.skip(f"no read-only bind mount here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    got: dict[str, object] = json.loads(r.stdout)
    return got


def test_a_read_only_repository_is_read_without_a_lock(tmp_path: Path) -> None:
    """A repository on a read-only mount restores and verifies, with one warning that
    no lock was taken; a live exclusive lock found there still refuses the read."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a read-only bind mount")
    repo, content = _build(tmp_path, points=2)
    bid = sorted(content)[-1]
    out = tmp_path / "r.raw"
    got = _read_only_read(repo.path, bid, out)
    assert out.read_bytes() == content[bid]
    warnings = got["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1
    assert "reading without a lock" in warnings[0] and "read-only" in warnings[0]
    notes = got["notes"]
    assert got["ok"] is True and isinstance(notes, list)
    assert any("reading without a lock" in n for n in notes)
    out.unlink()
    with exclusive(repo, "prune"):  # seen through the read-only mount as well
        got = _read_only_read(repo.path, bid, out)
    assert "locked by prune" in str(got.get("error")), got
    assert not out.exists()
