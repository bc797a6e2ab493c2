"""Kill a real backup process (SIGKILL) at every step of the commit order (packs ->
index files -> pages -> manifest), and torn objects a crash can leave.

The backup runs in a subprocess whose ``LocalBackend`` save path is wrapped (white-box,
in the test script only) to SIGKILL the process right before the N-th save, or in the
middle of writing it (half a temp file on disk). After each kill: the earlier restore
point is intact, no manifest names missing data, the leftovers are reported, and the
next backup works and restores byte-identical.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_cli
from store_helpers import all_packs, backup_image, make_mixed_image

import snapferry.engine.restore as restore_mod
import snapferry.engine.sources.restore_point as restore_point_mod
import snapferry.engine.store.chunks as chunks_mod
from snapferry.engine.restore import restore
from snapferry.engine.store import Repository
from snapferry.engine.verify import verify_repo

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, "tests")
    import snapferry.engine.store.backends.local as local
    from snapferry.engine.store import Repository
    from store_helpers import backup_image

    repo_path, image, nth, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    real_save, real_write = local.LocalBackend.save, local._write_all
    calls = []

    def save(self, kind, name, data, *, if_absent=True):
        if kind != "locks":
            calls.append(kind)
            print("save", len(calls), kind, flush=True)
            if len(calls) == nth and how == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            if len(calls) == nth and how == "during":
                local._write_all = half_then_die
        return real_save(self, kind, name, data, if_absent=if_absent)

    def half_then_die(fd, data):
        mv = memoryview(data).cast("B")
        real_write(fd, mv[: len(mv) // 2])
        os.fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    local.LocalBackend.save = save
    r = Repository.open(repo_path)
    parent = r.latest("vm")
    backup_image(r, {"sda": Path(image)}, vm="vm", parent=parent,
                 changed={"sda": range(10**6)} if parent else None)
    print("done", flush=True)
    """
)


def _run(repo: Path, image: Path, nth: int, how: str) -> tuple[int, list[str]]:
    p = subprocess.run(
        [sys.executable, "-c", KILLER, str(repo), str(image), str(nth), how],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    kinds = [ln.split()[2] for ln in p.stdout.splitlines() if ln.startswith("save ")]
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, kinds


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The save sequence of one incremental backup (no kill): kinds in order."""
    d = tmp_path_factory.mktemp("seq")
    repo = Repository.init(d / "repo", chunk_size=64 << 10, pack_size=1 << 20)
    img = d / "a.img"
    make_mixed_image(img, 3 * MiB, seed=1)
    backup_image(repo, {"sda": img}, vm="vm")
    make_mixed_image(img, 3 * MiB, seed=2)
    rc, kinds = _run(repo.path, img, 0, "none")
    assert rc == 0
    return kinds


def test_the_commit_order_is_packs_index_pages_manifest(steps: list[str]) -> None:
    assert steps[-1] == "snapshots" and steps.count("snapshots") == 1
    body = steps[:-1]
    assert body.count("data") >= 2 and body.count("data") == body.count("index")
    for k in range(0, len(body), 2):  # every pack is followed by its index file
        assert body[k : k + 2] == ["data", "index"]


@pytest.mark.parametrize("how", ["before", "during"])
def test_kill_at_every_step(tmp_path: Path, steps: list[str], how: str) -> None:
    results: list[str] = []
    for nth in range(1, len(steps) + 2 if how == "before" else len(steps) + 1):
        d = tmp_path / f"k{nth}"
        d.mkdir()
        repo = Repository.init(d / "repo", chunk_size=64 << 10, pack_size=1 << 20)
        img = d / "a.img"
        make_mixed_image(img, 3 * MiB, seed=1)
        first = backup_image(repo, {"sda": img}, vm="vm")
        first_data = img.read_bytes()
        make_mixed_image(img, 3 * MiB, seed=2)
        rc, _kinds = _run(repo.path, img, nth, how)
        committed = nth > len(steps)  # the manifest's save is the last step
        if nth <= len(steps):
            assert rc == -signal.SIGKILL, (nth, how, rc)
        else:
            assert rc == 0
        points = [m.backup_id for m in repo.list_backups()]
        assert points[0] == first.backup_id
        assert len(points) == (2 if committed else 1), (nth, how, points)
        rep = verify_repo(repo, None, read_data=True)
        assert rep.ok, (nth, how, rep.problems)
        out = d / "first.raw"
        restore(repo, first.backup_id, to=out)
        assert out.read_bytes() == first_data
        left = rep.leftovers
        results.append(f"{how} save #{nth} ({steps[nth - 1] if nth <= len(steps) else 'end'}): "
                       f"{left.packs} packs/{left.pack_bytes} B, {left.index_files} index, "
                       f"{left.temp_files} temp/{left.temp_bytes} B left")
        # the next backup works and restores byte-identical
        nxt = backup_image(repo, {"sda": img}, vm="vm", parent=repo.latest("vm"),
                           changed={"sda": range(10**6)})
        out2 = d / "next.raw"
        restore(repo, nxt.backup_id, to=out2)
        assert out2.read_bytes() == img.read_bytes()
        assert verify_repo(repo, None, read_data=True).ok
    print("\n".join(results))


def test_cli_backup_killed_mid_copy_then_next_backup(tmp_path: Path) -> None:
    """The real pipeline (worker processes) killed with SIGKILL to the process group
    while workers write packs; the repository stays consistent, the next works."""
    rp = tmp_path / "repo"
    assert run_cli("init", rp, "--chunk-size", "64K").returncode == 0
    img = tmp_path / "disk.img"
    make_mixed_image(img, 48 * MiB, seed=9)
    env_cmd = [sys.executable, "-m", "snapferry", "backup", str(img), "--repo", str(rp),
               "--name", "vm", "--workers", "2"]
    p = subprocess.Popen(env_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    repo = Repository.open(rp)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all_packs(repo) and p.poll() is None:
        time.sleep(0.02)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert repo.list_backups() == [] or p.returncode == 0
    rep = verify_repo(repo, None, read_data=True)
    assert rep.ok, rep.problems
    r = run_cli("backup", img, "--repo", rp, "--name", "vm")
    assert r.returncode == 0, r.stderr
    bid = repo.list_backups("vm")[-1].backup_id
    out = tmp_path / "out.raw"
    assert run_cli("restore", bid, "--repo", rp, "--to", out).returncode == 0
    assert out.read_bytes() == img.read_bytes()


def test_restore_with_frequent_writeback_is_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start write-out after every chunk (the real default is every 32 MiB) with one
    chunk per thread task, so the sync_file_range path runs many times."""
    repo = Repository.init(tmp_path / "repo", chunk_size=256 << 10)
    img = tmp_path / "disk.img"
    make_mixed_image(img, 5 * MiB + 3, seed=3)
    m = backup_image(repo, {"sda": img})
    calls: list[int] = []
    real = restore_mod._Writeback.wrote

    def counting(self: restore_mod._Writeback, n: int) -> None:
        calls.append(n)
        real(self, n)
        if sys.platform.startswith("linux"):
            assert self.fn is not None, "sync_file_range is available on Linux"

    monkeypatch.setattr(restore_mod, "WRITEBACK_EVERY", 1)
    monkeypatch.setenv("SNAPFERRY_DIRECT_IO", "0")  # the page-cache path, where write-out runs
    monkeypatch.setattr(restore_point_mod, "COPY_TASK_BYTES", 1)  # one chunk per task
    monkeypatch.setattr(chunks_mod, "RUN_MAX", 1)  # one blob per run
    monkeypatch.setattr(restore_mod._Writeback, "wrote", counting)
    out = tmp_path / "out.raw"
    res = restore(repo, m.backup_id, to=out, workers=2)
    assert out.read_bytes() == img.read_bytes()
    assert sum(calls) == res.bytes_written and len(calls) == res.unique_chunks
