"""``snapferry init``: remote-looking locations refused, only the last path component
created, the repository given with --repo / $SNAPFERRY_REPO, the JSON document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error, cli_env, run_cli

from snapferry.engine.errors import UsageError
from snapferry.engine.location import parse_location


@pytest.mark.parametrize(
    "location",
    ["s3:https://s3.example.com/bucket", "s3:bucket/prefix", "sftp:user@host:/srv/repo",
     "rest:http://127.0.0.1:8000/", "ftp://host/repo"],
)
def test_init_refuses_remote_looking_locations(tmp_path: Path, location: str) -> None:
    """Finding: ``init s3:https://...`` created local folders named ``s3:https:``."""
    p = run_cli("init", location, env=cli_env())
    line = assert_one_line_error(p, code=2)
    assert "not supported yet" in line and "s3:, sftp:, rest:" in line
    # nothing was created under the working directory (run_cli runs in the checkout)
    scheme = location.split(":", 1)[0]
    from conftest import ROOT

    assert not (ROOT / f"{scheme}:").exists()
    assert not any(ROOT.glob(f"{scheme}:*"))


def test_init_creates_only_the_last_component(tmp_path: Path) -> None:
    """Finding: ``init /nonexistent/dir/repo`` created every missing parent."""
    target = tmp_path / "nonexistent" / "dir" / "repo"
    p = run_cli("init", target)
    line = assert_one_line_error(p, code=2)
    assert "parent directory" in line and "does not exist" in line
    assert not (tmp_path / "nonexistent").exists()
    ok = run_cli("init", tmp_path / "repo")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "repo" / "config").is_file()


def test_init_takes_the_repository_from_repo_option_and_env(tmp_path: Path) -> None:
    p = run_cli("--repo", tmp_path / "a", "init", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["schema_version"] == 1 and doc["command"] == "init" and doc["ok"] is True
    assert doc["repository"] == str(tmp_path / "a") and "path" not in doc
    p = run_cli("init", env=cli_env(SNAPFERRY_REPO=str(tmp_path / "b")))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "b" / "config").is_file()


def test_file_uri_is_a_local_directory(tmp_path: Path) -> None:
    assert parse_location(f"file://{tmp_path}/r").path == tmp_path / "r"
    assert parse_location("backup:2024").path == Path("backup:2024")  # no //: a path
    with pytest.raises(UsageError, match="sftp"):
        parse_location("sftp:host:/x")


def test_other_commands_refuse_remote_repositories(tmp_path: Path) -> None:
    p = run_cli("list", "--repo", "s3:https://s3.example.com/bucket")
    assert "not supported yet" in assert_one_line_error(p, code=2)
