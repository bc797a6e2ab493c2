"""``snapferry list`` for people: aligned columns, nothing cut, units per value."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli


def test_list_aligns_columns_and_keeps_long_names(
    repo: Path, mixed_image: Path, tmp_path: Path
) -> None:
    """Finding: names were cut at 20 characters with no gap before the next column; all
    sizes were MiB."""
    small = tmp_path / "small.raw"
    small.write_bytes(b"x" * (16 << 10))
    long_name = "a-very-long-virtual-machine-name-for-the-web-tier"
    assert run_cli("backup", mixed_image, "--repo", repo, "--name", long_name).returncode == 0
    assert run_cli("backup", small, "--repo", repo).returncode == 0
    p = run_cli("list", "--repo", repo)
    assert p.returncode == 0, p.stderr
    header, *rows = p.stdout.splitlines()
    assert len(rows) == 2
    assert f" {long_name}  " in rows[0]  # whole, with a gap after it
    assert "64.0 MiB" in rows[0] and "16.0 KiB" in rows[1]  # the unit fits each value
    # every column starts where its header starts (left-aligned) or ends where it ends
    name_col = header.index("NAME")
    mode_col = header.index("MODE")
    assert mode_col >= name_col + len(long_name) + 2
    for row in rows:
        assert row[name_col - 2 : name_col] == "  " and row[name_col] != " "
        assert row[mode_col:].split()[0] == "full"
    size_end = header.index("SIZE") + len("SIZE")
    for row in rows:
        assert row[size_end - 1] == "B" and row[size_end] == " "  # right-aligned sizes


def test_list_of_one_series(repo: Path, mixed_image: Path) -> None:
    assert run_cli("backup", mixed_image, "--repo", repo, "--name", "a").returncode == 0
    assert run_cli("backup", mixed_image, "--repo", repo, "--name", "b").returncode == 0
    p = run_cli("list", "b", "--repo", repo)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 2
    assert run_cli("list", "c", "--repo", repo).stdout.strip() == "no restore points of c"


def test_list_shows_the_source(repo: Path, mixed_image: Path) -> None:
    """Finding: ``list`` did not say what a restore point was made from."""
    assert run_cli("backup", mixed_image, "--repo", repo, "--name", "x").returncode == 0
    header, row = run_cli("list", "--repo", repo).stdout.splitlines()
    assert header.split()[-1] == "SOURCE"
    assert row.endswith(str(mixed_image)) or row.split()[-1].endswith(f":{mixed_image}")
