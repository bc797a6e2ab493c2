"""The CLI's output contract: ``--json`` schemas, ``SNAPFERRY_REPO``, quiet pipes,
a progress bar on a terminal (a real pty), size parsing, ``python -m snapferry``."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
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
    assert re.search(r"^restore points +1 in 1 series$", info.stdout, re.M), info.stdout


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


def test_command_exit_flushes_and_runs_atexit(tmp_path: Path) -> None:
    """The command ends its process without the interpreter's teardown (cli/main.py
    ``_exit_now``): output bigger than a pipe's buffer arrives whole, the exit code is
    the command's, and atexit handlers still run."""
    p = run_cli("backup", "--help")  # > 4 KiB of help on a pipe
    assert p.returncode == 0 and p.stdout.rstrip().endswith("lab VM (snapferry lab up)")
    assert len(p.stdout) > 4096
    p = run_cli("backup", "--no-such-option")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    p = run_cli("restore", "--repo", tmp_path / "none", "x", "--to", tmp_path / "o")
    assert p.returncode == 1 and p.stderr.startswith("snapferry: no repository"), p.stderr
    mark = tmp_path / "atexit-ran"
    script = ("import atexit, sys; from snapferry.cli.main import main; "
              f"atexit.register(lambda: open({str(mark)!r}, 'w').write('x')); "
              "sys.argv = ['snapferry', '--version']; main()")
    q = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=ROOT, env=cli_env())
    assert q.returncode == 0 and q.stdout.startswith("snapferry "), q
    assert mark.read_text() == "x"


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


def test_sizes_choose_their_unit_per_value() -> None:
    from snapferry.engine.units import human_bytes

    assert human_bytes(0) == "0 B"
    assert human_bytes(512) == "512 B"
    assert human_bytes(16 << 10) == "16.0 KiB"
    assert human_bytes(1536 << 10) == "1.5 MiB"
    assert human_bytes(64 << 30) == "64.0 GiB"
    assert human_bytes((1 << 20) - 1) == "1.0 MiB"  # not "1024.0 KiB"


def test_demo_summary_uses_the_unit_chooser() -> None:
    """Finding: the demo printed "stored 0.0 MiB" for 16 KiB."""
    from snapferry.lab.demo import DemoReport, DemoStep

    r = DemoReport(accel="tcg", boot_seconds=1.0, repo="/r", seconds=9.0)
    r.steps.append(DemoStep("incremental", "id", "incremental", "filesystem", 80.0, 0.4,
                            bytes_read=256 << 10, bytes_stored=16 << 10,
                            virtual_size=256 << 20, files_checked=3, fsck_clean=True))
    text = r.summary()
    assert "stored   16.0 KiB" in text and "read  256.0 KiB of 256.0 MiB" in text
    assert "0.0 MiB" not in text


def test_progress_bar_unit_matches_what_it_counts() -> None:
    """Finding: the verify bar labelled chunks as bytes."""
    from snapferry.cli.output import TtyProgress

    bar = TtyProgress()
    try:
        bar.start("verify chunks", 10)
        assert bar._bar.unit == " chunks" and not bar._bar.unit_scale
        bar.start("verify", 10)  # the backup's pre-commit check counts chunks too
        assert bar._bar.unit == " chunks"
        bar.start("verify data", 1 << 20)
        assert bar._bar.unit == "B" and bar._bar.unit_scale
        bar.start("backup vm1", 1 << 20)
        assert bar._bar.unit == "B"
    finally:
        bar.finish()


def test_warnings_are_said_once(capsys: pytest.CaptureFixture[str]) -> None:
    """Finding: "warning: disk disk1: disk disk1: ..." (the backend's note, then the
    coordinator's warning that repeats it with the disk's name once more)."""
    from snapferry.cli.output import QuietProgress, TtyProgress, configure

    configure(command="backup")
    why = "disk disk1: no bitmap of the parent restore point: full backup"
    for progress in (QuietProgress(), TtyProgress()):
        configure(command="backup")
        progress.note(why)  # the backend's note
        progress.note(f"warning: disk disk1: {why}")  # the coordinator's warning
        progress.note(f"warning: disk disk1: {why}")
        err = capsys.readouterr().err
        assert err.count("disk disk1:") == 1, err
        assert err.count("\n") == 1, err
    configure(command=None)


def test_lab_status_fields_have_no_python_reprs() -> None:
    """Finding: ``lab status`` printed Python reprs (lists, dicts, None, True)."""
    from snapferry.cli.output import fields

    text = fields({"lab_dir": "/l", "running": True, "pid": None, "disks": ["/l/d0.qcow2",
                   "/l/d1.qcow2"], "bitmaps": {"lab-disk0": ["b1", "b2"], "lab-disk1": []},
                   "fsfreeze": "thawed"})
    for bad in ("[", "]", "{", "}", "None", "True", "'"):
        assert bad not in text, (bad, text)
    lines = text.splitlines()
    assert lines[1].split(None, 1) == ["running", "yes"]
    assert "/l/d0.qcow2, /l/d1.qcow2" in text and "lab-disk0: b1, b2; lab-disk1: -" in text
    col = len("fsfreeze") + 2  # the longest label, then the gap: values in one column
    for ln in lines:
        assert ln[col - 2 : col] == "  " and ln[col] != " ", ln
