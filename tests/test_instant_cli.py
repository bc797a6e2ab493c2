"""``snapferry instant``: bad input is refused before anything starts (no VM boot)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import assert_one_line_error, run_cli
from servecli import needs_serve
from store_helpers import backup_image, make_mixed_image

from snapferry.engine.store import Repository

pytestmark = needs_serve


def test_bad_input_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=256 << 10)
    img = tmp_path / "d.img"
    make_mixed_image(img, 4 << 20)
    m1 = backup_image(repo, {"disk0": img})
    m2 = backup_image(repo, {"disk0": img})
    lab = tmp_path / "lab"
    line = assert_one_line_error(run_cli("instant", "20990101T000000Z-0000", "--repo",
                                         repo.path, "--lab-dir", lab))
    assert "no restore point" in line
    line = assert_one_line_error(run_cli("instant", m1.backup_id, "--repo", repo.path,
                                         "--lab-dir", lab, "--live-restore", tmp_path / "nope"))
    assert "does not exist" in line
    # a lab dir holding the overlays of another restore point is refused
    lab.mkdir()
    (lab / "disk0.qcow2").write_bytes(b"")
    (lab / "instant.json").write_text(json.dumps({"backup_id": m2.backup_id,
                                                  "repo": str(repo.path.absolute())}))
    line = assert_one_line_error(run_cli("instant", m1.backup_id, "--repo", repo.path,
                                         "--lab-dir", lab))
    assert m2.backup_id in line and "another" in line
    assert sorted(p.name for p in lab.iterdir()) == ["disk0.qcow2", "instant.json"]
    assert not list(lab.glob("*.sock"))
