"""The CLI's output contract: ``--json`` schemas, ``SNAPFERRY_REPO``, quiet pipes,
a progress bar on a terminal (a real pty), size parsing, ``python -m snapferry``."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, run_cli, snapferry_exe

from snapferry.cli.main import main, parse_size
from snapferry.engine.store.repo import DEFAULT_CHUNK_SIZE

BACKUP_KEYS = {"backup_id", "mode", "seconds", "disks"}
DISK_KEYS = {"name", "virtual_size", "bytes_read", "bytes_stored", "chunks_new", "chunks_reused"}


def test_backup_json_schema(repo: Path, mixed_image: Path) -> None:
    p = run_cli("backup", mixed_image, "--repo", repo, "--json")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    doc = json.loads(p.stdout)  # exactly one JSON object, nothing else on stdout
    assert isinstance(doc, dict) and doc.keys() >= BACKUP_KEYS
    assert doc["mode"] == "full" and isinstance(doc["seconds"], float)
    (disk,) = doc["disks"]
    assert disk.keys() >= DISK_KEYS
    assert all(isinstance(disk[k], int) for k in DISK_KEYS - {"name"})
    assert disk["virtual_size"] == mixed_image.stat().st_size
    assert doc["vm"].endswith(":" + str(mixed_image)) and disk["name"] == "disk"


def test_repo_from_environment(repo: Path, mixed_image: Path, tmp_path: Path) -> None:
    env = cli_env(SNAPFERRY_REPO=str(repo))
    p = run_cli("backup", mixed_image, "--name", "envvm", "--json", env=env)
    assert p.returncode == 0, p.stderr
    bid = json.loads(p.stdout)["backup_id"]
    lst = run_cli("list", "--json", env=env)
    assert lst.returncode == 0
    backups = json.loads(lst.stdout)["backups"]
    assert [b["backup_id"] for b in backups] == [bid] and backups[0]["vm"] == "envvm"
    info = run_cli("info", "--json", env=env)
    assert info.returncode == 0
    assert json.loads(info.stdout)["restore_points"][0]["backup_id"] == bid
    v = run_cli("verify", bid, "--json", env=env)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"] is True
    r = run_cli("restore", bid, "--to", tmp_path / "o.raw", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["backup_id"] == bid
    # --repo wins over the environment
    other = tmp_path / "other"
    assert run_cli("init", other).returncode == 0
    lst = run_cli("list", "--repo", other, "--json", env=env)
    assert json.loads(lst.stdout)["backups"] == []


def test_human_output_without_tty(repo: Path, mixed_image: Path) -> None:
    p = run_cli("backup", mixed_image, "--repo", repo)
    assert p.returncode == 0 and p.stderr == ""  # no bar when not on a terminal
    assert p.stdout.startswith("full backup ") and "stored" in p.stdout
    lst = run_cli("list", "--repo", repo)
    assert mixed_image.name in lst.stdout and "full" in lst.stdout
    info = run_cli("info", "--repo", repo)
    assert "restore points 1" in info.stdout


def test_progress_bar_on_a_terminal(repo: Path, mixed_image: Path) -> None:
    """stdout and stderr on a real pty: a tqdm bar is drawn on stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    p = subprocess.Popen([*snapferry_exe(), "backup", str(mixed_image), "--repo", str(repo)],
                         stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                         env=cli_env(), cwd=ROOT)
    os.close(slave)
    out = b""
    try:
        while True:
            r, _, _ = select.select([master], [], [], 120)
            if not r:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        p.wait(timeout=60)
    assert p.returncode == 0, out
    text = out.decode(errors="replace")
    assert "backup " in text and "%|" in text  # tqdm's bar
    assert "full backup " in text


def test_python_dash_m_cli(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "snapferry", "init", str(tmp_path / "r"), "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["chunk_size"] == DEFAULT_CHUNK_SIZE


def test_main_in_process(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--repo", str(repo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backups"] == []
    assert main(["restore", "--repo", str(repo), "nope", "--to", "/tmp/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("snapferry: no restore point")
    assert main(["--help"]) == 0


def test_parse_size() -> None:
    assert parse_size("256K") == 256 << 10
    assert parse_size("1M") == parse_size("1MiB") == parse_size("1mb") == 1 << 20
    assert parse_size("65536") == 65536
    with pytest.raises(Exception, match="not a size"):
        parse_size("1.5M")
