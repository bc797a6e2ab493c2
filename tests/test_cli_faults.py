"""Failures as a user meets them through the ``snapferry`` command.

Each fault: non-zero exit, exactly one line on stderr, no traceback, no manifest for the
failed backup, earlier restore points intact (``verify --read-data`` and a restore),
and the next backup succeeds.

Worker faults use real processes: a worker SIGKILLed from outside, or by the test-only
hook ``SNAPFERRY_TEST_KILL_WORKER_AFTER``; Ctrl-C and SIGTERM are real signals sent
while a worker is held by the test-only hook ``SNAPFERRY_TEST_STALL_AFTER``. Disk full
is a real tiny tmpfs (root) or, without root, RLIMIT_FSIZE (EFBIG) on the process.
"""

from __future__ import annotations

import filecmp
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import imagegen
import pytest
from conftest import (
    assert_one_line_error,
    cli_env,
    manifests,
    run_cli,
    small_tmpfs,
    snapferry_exe,
)


def first_backup(repo: Path, image: Path) -> str:
    p = run_cli("backup", image, "--repo", repo, "--json")
    assert p.returncode == 0, p.stderr
    return str(json.loads(p.stdout)["backup_id"])


def assert_intact(repo: Path, backup_id: str, image: Path, tmp_path: Path) -> None:
    """Earlier restore point still whole; the repository works for the next backup."""
    v = run_cli("verify", "--repo", repo, "--read-data", "--json")
    assert v.returncode == 0, v.stdout + v.stderr
    report = json.loads(v.stdout)
    assert report["ok"] and report["backups_checked"] == [backup_id]
    assert report["leftovers"]["temp_files"] == 0, "temp files left behind"
    assert not list((repo / "locks").iterdir()), "lock left behind"
    out = tmp_path / f"check-{backup_id}.raw"
    r = run_cli("restore", "--repo", repo, backup_id, "--to", out, "--force")
    assert r.returncode == 0, r.stderr
    assert filecmp.cmp(out, image, shallow=False)
    nxt = run_cli("backup", image, "--repo", repo, "--json")
    assert nxt.returncode == 0, nxt.stderr
    assert len(manifests(repo)) == 2


def no_failed_manifest(repo: Path) -> None:
    assert len(manifests(repo)) == 1


# -- bad input -------------------------------------------------------------------------


def test_missing_repo_path(tmp_path: Path, mixed_image: Path) -> None:
    line = assert_one_line_error(
        run_cli("backup", mixed_image, "--repo", tmp_path / "nope"), code=1
    )
    assert "no repository" in line and "does not exist" in line


def test_not_a_snapferry_dir(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    line = assert_one_line_error(run_cli("list", "--repo", tmp_path / "junk"))
    assert "not a snapferry repository" in line
    line = assert_one_line_error(run_cli("init", tmp_path / "junk"))
    assert "not empty" in line


def test_no_repo_given(mixed_image: Path) -> None:
    line = assert_one_line_error(run_cli("backup", mixed_image), code=2)
    assert "SNAPFERRY_REPO" in line


def test_usage_errors_are_one_line(repo: Path) -> None:
    assert_one_line_error(run_cli("frobnicate"), code=2)
    assert_one_line_error(run_cli("init", repo.parent / "r2", "--chunk-size", "lots"), code=2)
    line = assert_one_line_error(run_cli("init", repo.parent / "r3", "--chunk-size", "3M"), 2)
    assert "power of two" in line
    line = assert_one_line_error(run_cli("backup", "gopher://x/y", "--repo", repo), code=2)
    assert "accepted forms" in line
    line = assert_one_line_error(run_cli("backup", repo / "missing.raw", "--repo", repo))
    assert "does not exist" in line
    assert_one_line_error(run_cli("restore", "--repo", repo, "x"), code=2)  # no --to


def test_unknown_backup_id(repo: Path, tmp_path: Path) -> None:
    line = assert_one_line_error(
        run_cli("restore", "--repo", repo, "20990101T000000Z-dead", "--to", tmp_path / "o")
    )
    assert "no restore point" in line
    assert not (tmp_path / "o").exists()
    assert_one_line_error(run_cli("verify", "--repo", repo, "20990101T000000Z-dead"))


def test_restore_target_exists(repo: Path, mixed_image: Path, tmp_path: Path) -> None:
    bid = first_backup(repo, mixed_image)
    target = tmp_path / "target.raw"
    target.write_text("precious")
    line = assert_one_line_error(run_cli("restore", "--repo", repo, bid, "--to", target), 2)
    assert "--force" in line
    assert target.read_text() == "precious"
    r = run_cli("restore", "--repo", repo, bid, "--to", target, "--force")
    assert r.returncode == 0, r.stderr
    assert filecmp.cmp(target, mixed_image, shallow=False)


def test_incremental_without_parent_is_refused(repo: Path, mixed_image: Path) -> None:
    line = assert_one_line_error(
        run_cli("backup", mixed_image, "--repo", repo, "--mode", "incremental"), code=2
    )
    assert "full backup first" in line
    assert manifests(repo) == []


# -- worker faults ---------------------------------------------------------------------


def test_worker_killed_by_hook(repo: Path, mixed_image: Path, tmp_path: Path) -> None:
    bid = first_backup(repo, mixed_image)
    changed = tmp_path / "changed.raw"
    shutil.copyfile(mixed_image, changed)
    imagegen.rewrite_blocks(changed, 0.2, seed=1)  # new chunks to write
    p = run_cli("backup", changed, "--repo", repo, "--name", mixed_image.name,
                env=cli_env(SNAPFERRY_TEST_KILL_WORKER_AFTER="6"))
    line = assert_one_line_error(p, code=1)
    assert "reader worker" in line and "SIGKILL" in line and "nothing was committed" in line
    no_failed_manifest(repo)
    assert_intact(repo, bid, mixed_image, tmp_path)


def start_stalled_backup(
    repo: Path, image: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> tuple[subprocess.Popen[str], list[int]]:
    """A backup whose workers block after 4 chunks; returns it once a worker is held."""
    stall = tmp_path / "stall.pids"
    env = cli_env(SNAPFERRY_TEST_STALL_AFTER="4", SNAPFERRY_TEST_STALL_FILE=str(stall))
    p = subprocess.Popen(
        [*snapferry_exe(), "backup", str(image), "--repo", str(repo), "--name", "stalled"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # its own process group, like a terminal job
    )
    procs.append(p)
    deadline = time.monotonic() + 60
    while not (stall.exists() and stall.read_text().strip()):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "backup never reached the stall point"
        time.sleep(0.05)
    pids = [int(x) for x in stall.read_text().split()]
    return p, pids


def pid_gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie child of a parent that has exited is reaped by init soon
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_worker_killed_from_outside(
    repo: Path, mixed_image: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    bid = first_backup(repo, mixed_image)
    other = imagegen.make_image(tmp_path / "other.raw", 32 << 20, seed=99)
    p, pids = start_stalled_backup(repo, other, tmp_path, procs)
    os.kill(pids[0], signal.SIGKILL)
    _out, err = p.communicate(timeout=60)
    line = assert_one_line_error(subprocess.CompletedProcess(p.args, p.returncode, _out, err))
    assert "killed by SIGKILL" in line
    assert all(pid_gone(pid) for pid in pids)
    no_failed_manifest(repo)
    assert_intact(repo, bid, mixed_image, tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_backup_rolls_back(
    sig: signal.Signals,
    repo: Path,
    mixed_image: Path,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    bid = first_backup(repo, mixed_image)
    other = imagegen.make_image(tmp_path / "other.raw", 32 << 20, seed=98)
    p, pids = start_stalled_backup(repo, other, tmp_path, procs)
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)  # Ctrl-C: the whole foreground process group
    else:
        os.kill(p.pid, sig)  # kill PID: only the main process
    out, err = p.communicate(timeout=60)
    line = assert_one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err), 130)
    assert "interrupted" in line
    assert all(pid_gone(pid) for pid in pids), "workers left running"
    no_failed_manifest(repo)
    assert_intact(repo, bid, mixed_image, tmp_path)


# -- disk full -------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (needs root); skipped otherwise (the RLIMIT test still runs)."""
    with small_tmpfs(tmp_path / "small", "6m",
                     "mounting a tmpfs needs root; test_file_size_limit covers disk full") as m:
        yield m


def test_disk_full(small_fs: Path, tmp_path: Path) -> None:
    repo = small_fs / "repo"
    assert run_cli("init", repo, "--chunk-size", "256K").returncode == 0
    small = imagegen.make_image(tmp_path / "small.raw", 2 << 20, seed=1, zero_frac=0,
                                text_frac=1, random_frac=0, repeat_frac=0)
    bid = first_backup(repo, small)
    big = imagegen.make_image(tmp_path / "big.raw", 16 << 20, seed=2, zero_frac=0,
                              text_frac=0, random_frac=1, repeat_frac=0)
    line = assert_one_line_error(run_cli("backup", big, "--repo", repo, "--name", "small.raw"))
    assert "disk is full" in line
    no_failed_manifest(repo)
    assert_intact(repo, bid, small, tmp_path)


def test_file_size_limit(repo: Path, tmp_path: Path) -> None:
    """Without root: RLIMIT_FSIZE makes chunk writes fail (EFBIG) like a full disk."""
    small = imagegen.make_image(tmp_path / "small.raw", 2 << 20, seed=1, zero_frac=0,
                                text_frac=1, random_frac=0, repeat_frac=0)
    bid = first_backup(repo, small)
    big = imagegen.make_image(tmp_path / "big.raw", 8 << 20, seed=2, zero_frac=0,
                              text_frac=0, random_frac=1, repeat_frac=0)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, 512 << 10))

    p = subprocess.run(
        [*snapferry_exe(), "backup", str(big), "--repo", str(repo), "--name", "small.raw"],
        capture_output=True, text=True, env=cli_env(), preexec_fn=limit, timeout=300,
    )
    line = assert_one_line_error(p)
    assert "file size limit" in line
    no_failed_manifest(repo)
    assert_intact(repo, bid, small, tmp_path)
