"""``snapferry info`` for people: one column of values, one precision per kind."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_cli


def test_info_is_aligned_with_consistent_precision(repo: Path, mixed_image: Path) -> None:
    """Finding: ``info`` was misaligned ('compression ratio' overran its column) and mixed
    precisions."""
    assert run_cli("backup", mixed_image, "--repo", repo).returncode == 0
    p = run_cli("info", "--repo", repo)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    starts = {re.search(r"\S+( \S+)*?  +(?=\S)", ln).end() for ln in lines}  # type: ignore[union-attr]
    assert len(starts) == 1, p.stdout  # every value starts in the same column
    fields = {ln[: next(iter(starts))].strip(): ln[next(iter(starts)):] for ln in lines}
    for key in ("dedup ratio", "compression ratio", "total ratio"):
        assert re.fullmatch(r"\d+\.\d\dx", fields[key]), (key, fields[key])
    sizes = re.findall(r"\d+(?:\.\d+)? (?:B|KiB|MiB|GiB)", p.stdout)
    assert sizes
    for s in sizes:
        num, unit = s.split()
        assert (unit == "B" and "." not in num) or re.fullmatch(r"\d+\.\d", num), s
    assert fields["restore points"] == "1 in 1 series"
