"""``snapferry backup`` of a live VM through the real CLI (a subprocess), on the lab VM:
the --json document, --mode full / incremental, one-line errors and their exit codes,
and the ``lab`` target / ``lab status`` against the shared lab VM (SNAPFERRY_LAB_DIR).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from coordvm import CHUNK, check_restore_point, cli, count_backups, vm_work_dir, write_known
from labvm import assert_vm_clean, lab_vm

from snapferry.engine.store.repo import Repository
from snapferry.lab.vm import LabVm

pytestmark = pytest.mark.vm
__all__ = ["lab_vm"]  # the session fixture, imported for pytest

KEYS = {"backup_id", "mode", "seconds", "disks", "quiesced", "consistency", "freeze_ms",
        "committed", "verified"}


def backup_json(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    p = cli(["backup", *args, "--json"], env_extra=env)
    assert p.returncode == 0, (p.returncode, p.stderr)
    doc = json.loads(p.stdout)  # exactly one JSON document (json.loads rejects extra data)
    assert isinstance(doc, dict)
    assert "Traceback" not in p.stderr
    return doc


def one_line_error(p: Any) -> str:
    err = str(p.stderr).strip()
    assert len(err.splitlines()) == 1 and err.startswith("snapferry: "), err
    assert "Traceback" not in err
    assert p.stdout == "" or json.loads(p.stdout)["ok"] is False  # --json: an error document
    return err


def test_backup_json_modes(lab_vm: LabVm, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    work = vm_work_dir(lab_vm, tmp_path, monkeypatch)
    repo = Repository.init(tmp_path / "repo", chunk_size=CHUNK)
    r = str(repo.path)

    # --mode incremental with no earlier restore point: refused, nothing changed
    p = cli(["backup", lab_vm.uri, "--repo", r, "--mode", "incremental", "--json"])
    assert p.returncode != 0
    assert "incremental" in one_line_error(p)
    assert count_backups(repo) == 0
    assert_vm_clean(lab_vm, work)

    files = write_known(lab_vm, "cli", 2)
    full = backup_json([lab_vm.uri, "--repo", r, "--quiesce", "required"])
    assert set(full) >= KEYS, KEYS - set(full)
    assert full["mode"] == "full" and full["parent"] is None
    assert full["quiesced"] is True and full["consistency"] == "filesystem"
    assert full["freeze_ms"] > 0 and full["committed"] is True and full["verified"] == "quick"
    assert full["seconds"] > 0
    assert [d["name"] for d in full["disks"]] == ["disk0", "disk1"]
    assert all(d["virtual_size"] == 32 << 20 for d in full["disks"])
    assert full["disks"][0]["bytes_read"] > 0
    assert_vm_clean(lab_vm, work)
    check_restore_point(repo, full["backup_id"], files, tmp_path)

    incr = backup_json([lab_vm.uri, "--repo", r, "--mode", "incremental"])
    assert incr["mode"] == "incremental" and incr["parent"] == full["backup_id"]
    assert incr["consistency"] == "filesystem"  # --quiesce preferred (default) worked
    assert incr["disks"][0]["bytes_read"] < full["disks"][0]["bytes_read"]

    forced = backup_json([lab_vm.uri, "--repo", r, "--mode", "full", "--quiesce", "off"])
    assert forced["mode"] == "full" and forced["parent"] is None
    assert forced["quiesced"] is False and forced["consistency"] == "crash"
    assert forced["freeze_ms"] is None
    assert forced["disks"][0]["bytes_read"] >= full["disks"][0]["bytes_read"] // 2
    assert count_backups(repo) == 3
    assert_vm_clean(lab_vm, work)

    # --name files a VM's restore points under another series (it was ignored for VMs):
    # a new series, so a full backup; the VM's own series is untouched
    named = backup_json([lab_vm.uri, "--repo", r, "--name", "web-tier/vm1"])
    assert named["vm"] == "web-tier/vm1" and named["mode"] == "full"
    assert named["parent"] is None
    again = backup_json([lab_vm.uri, "--repo", r, "--name", "web-tier/vm1"])
    assert again["mode"] == "incremental" and again["parent"] == named["backup_id"]
    assert {m.vm for m in repo.list_backups()} == {full["vm"], "web-tier/vm1"}
    assert_vm_clean(lab_vm, work)


@pytest.mark.parametrize(
    "source, needle",
    [
        ("qemu+unix:///nonexistent/qmp.sock?agent=/nonexistent/qga.sock", "does not exist"),
        ("qemu+unix://somehost/qmp.sock", "no host"),
        ("qemu+unix:///tmp/qmp.sock?bogus=1", "unknown parameter"),
    ],
)
def test_bad_uri_is_one_line_exit_2(tmp_path: Path, source: str, needle: str) -> None:
    repo = Repository.init(tmp_path / "repo")
    p = cli(["backup", source, "--repo", str(repo.path), "--json"])
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert needle in one_line_error(p)
    assert count_backups(repo) == 0


def test_lab_target_and_status(lab_vm: LabVm, tmp_path: Path) -> None:
    """``lab`` names the running lab VM (found through SNAPFERRY_LAB_DIR)."""
    env = {"SNAPFERRY_LAB_DIR": str(lab_vm.lab_dir)}
    p = cli(["lab", "status", "--json"], env_extra=env)
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["running"] is True
    repo = Repository.init(tmp_path / "repo", chunk_size=CHUNK)
    doc = backup_json(["lab", "--repo", str(repo.path), "--quiesce", "required"], env)
    assert doc["mode"] == "full" and doc["consistency"] == "filesystem"
    assert repo.load_manifest(doc["backup_id"]).vm == "lab"
    assert_vm_clean(lab_vm, lab_vm.lab_dir / "work")
