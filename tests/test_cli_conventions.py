"""CLI conventions: --version, global options before or after the command, bare
``snapferry`` and ``help [COMMAND]``, help text and shown defaults for every flag,
examples in every command's epilog, documented exit codes, shell completion, and the
CLI split (no two CLI modules import each other)."""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, assert_one_line_error, cli_env, run_cli, snapferry_exe

from snapferry.cli.common import EXIT_CODES
from snapferry.cli.main import build_parser
from snapferry.cli.output import NotesProgress, QuietProgress, configure, make_progress

MINE = ("init", "backup", "restore", "list", "verify", "info", "help")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_version() -> None:
    """Finding: ``snapferry --version`` failed."""
    from snapferry import __version__

    p = run_cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"snapferry {__version__}"


def test_bare_snapferry_prints_help() -> None:
    """Finding: bare ``snapferry`` printed only an error."""
    p = run_cli()
    assert p.returncode == 2
    assert p.stdout.startswith("usage: snapferry") and "commands:" in p.stdout
    assert "exit status:" in p.stdout and p.stderr == ""


def test_help_command() -> None:
    p = run_cli("help")
    assert p.returncode == 0 and "commands:" in p.stdout
    p = run_cli("help", "restore")
    assert p.returncode == 0 and p.stdout.startswith("usage: snapferry restore")
    assert "--force-in-use" in p.stdout
    assert "backup" in assert_one_line_error(run_cli("help", "nope"), code=2)


def test_global_options_before_or_after_the_command(repo: Path, mixed_image: Path) -> None:
    """Finding: ``snapferry --repo R list`` was refused."""
    assert run_cli("backup", mixed_image, "--repo", repo, "-q").returncode == 0
    for argv in (["--repo", repo, "list", "--json"], ["--json", "--repo", repo, "list"],
                 ["list", "--repo", repo, "--json"], ["--repo", repo, "--json", "-q", "list"]):
        p = run_cli(*argv)
        assert p.returncode == 0, (argv, p.stderr)
        assert len(json.loads(p.stdout)["backups"]) == 1
    # after the command wins over before it
    p = run_cli("--repo", "/nonexistent-a", "list", "--repo", repo)
    assert p.returncode == 0, p.stderr


def test_verbose_and_quiet_choose_the_reporter() -> None:
    configure(command="backup", quiet=True)
    assert isinstance(make_progress(False), QuietProgress)
    configure(command="backup", verbose=1)
    assert isinstance(make_progress(False), NotesProgress)  # stdout is not a tty here
    configure(command=None)


def test_every_flag_has_help_and_shows_its_default() -> None:
    """Finding: many flags had no help text and none showed its default."""
    missing: list[str] = []
    no_default: list[str] = []
    for name, p in _subparsers().items():
        formatter = p._get_formatter()
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.option_strings and name not in MINE:
                continue  # positionals of the lab/demo commands are cli/vm.py's
            if not action.help:
                missing.append(label)
                continue
            shows = formatter._get_help_string(action)  # type: ignore[attr-defined]
            trivial = action.default in (None, False, argparse.SUPPRESS) or isinstance(
                action, argparse._CountAction)
            if not trivial and "default" not in shows:
                no_default.append(label)
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"defaults not shown: {no_default}"


def test_every_command_has_examples() -> None:
    for name, p in _subparsers().items():
        assert p.epilog and "examples:" in p.epilog, name
        assert f"snapferry {name}" in p.epilog, name


def test_exit_codes_documented() -> None:
    """Finding: exit codes 0, 1, 2, 3, 70, 130 were undocumented."""
    codes = [c for c, _ in EXIT_CODES]
    assert codes == [0, 1, 2, 3, 70, 130]
    text = run_cli("--help").stdout
    readme = (ROOT / "README.md").read_text()
    for c in codes:
        assert f"\n  {c} " in text, c
        assert f"| {c} |" in readme, c


def test_documented_codes_are_the_ones_used(repo: Path, tmp_path: Path) -> None:
    assert run_cli("list", "--repo", repo).returncode == 0
    assert run_cli("list", "--repo", tmp_path / "none").returncode == 1
    assert run_cli("list", "--bogus").returncode == 2


def test_shell_completion(tmp_path: Path) -> None:
    pytest.importorskip("argcomplete")
    out = tmp_path / "completions"
    line = "snapferry restore latest --fo"
    env = cli_env(_ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
                  _ARGCOMPLETE_STDOUT_FILENAME=str(out))
    import subprocess

    with open(os.devnull, "w") as null:
        p = subprocess.run(snapferry_exe(), env=env, stdin=subprocess.DEVNULL,
                           stdout=null, stderr=null, pass_fds=(), timeout=60)
    assert p.returncode == 0
    words = out.read_text().replace("\x0b", "\n").split()
    assert {"--format", "--force", "--force-in-use"} <= set(words)


def _cli_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("snapferry.cli."):
                out.add(node.module.removeprefix("snapferry.cli."))
            elif node.module == "snapferry.cli":
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("snapferry.cli."):
                    out.add(a.name.removeprefix("snapferry.cli."))
    return out


def test_no_two_cli_modules_import_each_other() -> None:
    """Finding (issue 8): cli/main.py and cli/vm.py imported each other."""
    graph = {p.stem: _cli_imports(p) for p in (ROOT / "cli").glob("*.py")}
    for a, deps in graph.items():
        for b in deps:
            assert a not in graph.get(b, set()), f"cli/{a}.py and cli/{b}.py import each other"
    # and no longer cycles: only main imports the command modules
    for a, deps in graph.items():
        if a not in ("main", "__main__"):  # the entry points
            assert "main" not in deps, f"cli/{a}.py imports cli/main.py"


def test_every_environment_variable_is_documented() -> None:
    """Finding: SNAPFERRY_LAB_DIR, SNAPFERRY_DEBUG and others were undocumented."""
    import re

    used: set[str] = set()
    for folder in ("engine", "native", "cli", "pkgroot", "tests", "bench", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            constants = set(re.findall(r"^(SNAPFERRY_[A-Z_]+) = ", text, re.M))
            used |= set(re.findall(r"SNAPFERRY_[A-Z][A-Z_]*[A-Z]", text)) - constants
    readme = (ROOT / "README.md").read_text()
    missing = sorted(v for v in used if not re.search(rf"`{v}[`=]", readme))
    assert not missing, f"not in the README: {missing}"
    from snapferry.cli.common import ENVIRONMENT

    helptext = run_cli("--help").stdout
    for name, _what in ENVIRONMENT:
        assert name in helptext
