"""The man page is generated from the parser and is current; the systemd example units
call commands that the parser accepts."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from snapferry.cli.main import build_parser


def test_man_page_is_current() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-manpage.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr + " (run .venv/bin/python scripts/gen-manpage.py)"


def test_man_page_names_every_command_and_flag() -> None:
    text = (ROOT / "docs" / "snapferry.1").read_text()
    parser = build_parser()
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert f".SS {name} " in text, name
        for action in p._actions:
            for opt in action.option_strings:
                assert opt.replace("-", "\\-") in text, (name, opt)


@pytest.mark.skipif(shutil.which("man") is None, reason="needs man")
def test_man_renders(tmp_path: Path) -> None:
    p = subprocess.run(["man", "-l", str(ROOT / "docs" / "snapferry.1")], capture_output=True,
                       text=True, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert "EXIT STATUS" in p.stdout and "restore" in p.stdout


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_systemd_units_run_real_commands() -> None:
    d = ROOT / "docs" / "systemd"
    svc = _unit(d / "snapferry-backup@.service")
    timer = _unit(d / "snapferry-backup@.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"
    parser = build_parser()
    for key in ("ExecStart", "ExecStartPost"):
        argv = svc["Service"][key].split()
        assert argv[0].endswith("/snapferry")
        words = [w.replace("${SOURCE}", "qemu+unix:///run/vm1/qmp.sock").replace("%i", "vm1")
                 for w in argv[1:] if w != "$BACKUP_ARGS"]
        parser.parse_args(words)  # raises UsageError if the unit calls a bad command
