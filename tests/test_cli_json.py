"""One versioned JSON schema for every command (docs/JSON.md): the envelope, the same
key names for the same things, disks as objects everywhere, ``list --json`` complete
enough for scripts, an error document on stdout under ``--json`` with the exit code
unchanged, and one clock (``seconds`` == ``phase_seconds.total``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from conftest import ROOT, run_cli

from snapferry.cli.output import SCHEMA_VERSION, configure, envelope
from snapferry.cli.shapes import DISK_KEYS

POINT_KEYS = {
    "backup_id", "vm", "identity", "created", "mode", "parent", "consistency", "quiesced",
    "freeze_ms", "verified", "source", "chunk_size", "logical_bytes", "bytes_read", "bytes_stored",
    "chunks", "zero_chunks", "chunks_new", "chunks_reused", "seconds", "warnings", "disks",
}


def _doc(*args: Any, code: int = 0) -> dict[str, Any]:
    p = run_cli(*args, "--json")
    assert p.returncode == code, p.stderr
    doc = json.loads(p.stdout)
    assert isinstance(doc, dict)
    assert list(doc)[:3] == ["schema_version", "command", "ok"], list(doc)
    assert doc["schema_version"] == SCHEMA_VERSION
    return doc


def test_every_command_shares_the_envelope_and_key_names(
    tmp_path: Path, mixed_image: Path
) -> None:
    """Findings: no schema version; ``repository`` vs ``path``; disks as objects in one
    command and as names in another."""
    repo = tmp_path / "r"
    init = _doc("init", repo)
    assert init["command"] == "init" and init["repository"] == str(repo)
    backup = _doc("backup", mixed_image, "--repo", repo)
    assert backup["command"] == "backup" and backup["ok"] is True
    assert backup["repository"] == str(repo)
    assert {"quiesced", "freeze_ms", "warnings", "seconds", "consistency"} <= backup.keys()
    bid = backup["backup_id"]
    restore = _doc("restore", bid[:10], "--repo", repo, "--to", tmp_path / "o.raw")
    assert restore["repository"] == str(repo) and restore["backup_id"] == bid
    assert restore["disk"]["name"] == "disk" and restore["disk"]["virtual_size"] > 0
    lst = _doc("list", "--repo", repo)
    verify = _doc("verify", "--repo", repo)
    info = _doc("info", "--repo", repo)
    for d in (lst, verify, info):
        assert d["repository"] == str(repo) and "path" not in d
    (point,) = lst["backups"]
    (ipoint,) = info["restore_points"]
    assert ipoint.keys() >= POINT_KEYS and "data_bytes" in ipoint
    for p in (point, ipoint):
        for disk in p["disks"]:
            assert isinstance(disk, dict) and disk.keys() >= set(DISK_KEYS)


def test_list_json_is_complete_for_scripts(repo: Path, mixed_image: Path) -> None:
    """Finding: ``list --json`` lacked the source, quiesced, freeze_ms and chunk counts."""
    backup = _doc("backup", mixed_image, "--repo", repo)
    (point,) = _doc("list", "--repo", repo)["backups"]
    assert point.keys() >= POINT_KEYS
    assert point["source"]["kind"] == "file" and point["source"]["path"] == str(mixed_image)
    assert point["quiesced"] is None and point["freeze_ms"] is None  # an image: n/a
    assert point["consistency"] == "n/a" and point["mode"] == "full"
    assert point["parent"] is None
    (disk,) = backup["disks"]
    assert point["chunks"] == disk["chunks"] > 0
    assert point["zero_chunks"] == disk["zero_chunks"]
    assert point["chunks_new"] + point["chunks_reused"] + point["zero_chunks"] <= point["chunks"]
    assert point["bytes_read"] == disk["bytes_read"]
    assert point["bytes_stored"] == disk["bytes_stored"]
    assert point["logical_bytes"] == mixed_image.stat().st_size


def test_errors_are_json_documents_too(tmp_path: Path, repo: Path) -> None:
    """Finding: a failing command printed nothing on stdout under ``--json``."""
    for args, code, kind in (
        (("list", "--repo", tmp_path / "none"), 1, "RepositoryError"),
        (("restore", "nope", "--repo", repo, "--to", tmp_path / "x.raw"), 1,
         "RepositoryError"),
        (("list", "--bogus"), 2, "UsageError"),
        (("init", "s3:bucket"), 2, "UsageError"),
    ):
        p = run_cli(*args, "--json")
        assert p.returncode == code, (args, p.stderr)
        doc = json.loads(p.stdout)
        assert doc["ok"] is False and doc["schema_version"] == SCHEMA_VERSION
        assert doc["command"] == args[0]
        assert doc["error"]["exit_code"] == code and doc["error"]["type"] == kind
        assert p.stderr.strip() == f"snapferry: {doc['error']['message']}"


def test_one_clock_for_seconds() -> None:
    """Finding: a VM backup said ``seconds`` 0.64 and ``phase_seconds.total`` 0.915."""
    configure(command="backup", repository="/r")
    try:
        doc = envelope({"backup_id": "x", "seconds": 0.64,
                        "phase_seconds": {"copy": 0.5, "total": 0.915}})
    finally:
        configure(command=None)
    assert doc["seconds"] == doc["phase_seconds"]["total"] == 0.915
    assert doc["repository"] == "/r" and doc["command"] == "backup"


def test_json_md_documents_every_key_the_commands_print() -> None:
    text = (ROOT / "docs" / "JSON.md").read_text()
    for key in POINT_KEYS | set(DISK_KEYS) | {"schema_version", "repository", "error"}:
        assert re.search(rf"`{key}`", text), key
