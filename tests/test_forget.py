"""forget: restic's calendar rules, the 90-day done-when test, the CLI's table/JSON/errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prune_helpers import evolve, point_at, read_data_ok, restores_identical

from snapferry.engine.errors import UsageError
from snapferry.engine.forget import forget
from snapferry.engine.retention import Duration, Point, Policy, apply_policy, parse_duration
from snapferry.engine.store import Repository
from snapferry.engine.store.blobs import TYPE_CHUNK

CS = 64 << 10


def _t(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=UTC)


def _kept(points: list[Point], policy: Policy) -> dict[str, list[str]]:
    return {d.point.backup_id: d.reasons for d in apply_policy(points, policy) if d.keep}


def _pts(*times: str) -> list[Point]:
    return [Point(t, "vm", _t(t)) for t in times]


def test_buckets_keep_the_newest_point_of_each_and_skip_empty_buckets() -> None:
    pts = _pts("2026-01-01T01:00", "2026-01-01T23:00", "2026-01-02T05:00", "2026-01-05T05:00")
    # three daily buckets hold points (Jan 1, 2, 5); empty days 3 and 4 do not count
    assert _kept(pts, Policy(daily=3)) == {
        "2026-01-05T05:00": ["daily"], "2026-01-02T05:00": ["daily"],
        "2026-01-01T23:00": ["daily"],
    }
    assert _kept(pts, Policy(last=1, hourly=2)) == {
        "2026-01-05T05:00": ["last", "hourly"], "2026-01-02T05:00": ["hourly"],
    }
    assert set(_kept(pts, Policy(daily=-1))) == {
        "2026-01-05T05:00", "2026-01-02T05:00", "2026-01-01T23:00"}


def test_weeks_are_iso_weeks_and_years_calendar_years() -> None:
    # 2026-01-04 is a Sunday (ISO week 1 of 2026); 2026-01-05 a Monday (week 2);
    # 2025-12-29 a Monday in ISO week 1 of 2026 too
    pts = _pts("2025-12-28T12:00", "2025-12-29T12:00", "2026-01-04T12:00", "2026-01-05T12:00")
    assert set(_kept(pts, Policy(weekly=3))) == {
        "2026-01-05T12:00", "2026-01-04T12:00", "2025-12-28T12:00"}
    assert set(_kept(pts, Policy(yearly=5))) == {"2026-01-05T12:00", "2025-12-29T12:00"}
    assert set(_kept(pts, Policy(monthly=1))) == {"2026-01-05T12:00"}


def test_keep_within_counts_back_from_the_newest_point_by_the_calendar() -> None:
    pts = _pts("2026-01-31T00:00", "2026-02-27T23:00", "2026-03-01T00:00", "2026-03-31T00:00")
    # 1m before Mar 31 is Feb 28 (clamped): Feb 27 23:00 is outside
    assert set(_kept(pts, Policy(within=parse_duration("1m")))) == {
        "2026-03-01T00:00", "2026-03-31T00:00"}
    assert set(_kept(pts, Policy(within=parse_duration("2m")))) == {
        "2026-01-31T00:00", "2026-02-27T23:00", "2026-03-01T00:00", "2026-03-31T00:00"}
    assert parse_duration("1y6m2d3h") == Duration(1, 6, 2, 3)
    for bad in ("", "7", "7x", "d7", "1d1d", "-1d"):
        with pytest.raises(UsageError):
            parse_duration(bad)


def _repo(tmp: Path) -> Repository:
    return Repository.init(tmp / "repo", chunk_size=CS, pack_size=1 << 20)


def test_ninety_daily_points_keep_daily_7_weekly_4_monthly_3_then_prune(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    img = tmp_path / "disk.img"
    rng = random.Random(10)
    img.write_bytes(rng.randbytes(16 * CS))
    start = datetime(2026, 1, 1, 2, 30, tzinfo=UTC)
    content: dict[str, bytes] = {}
    day_of: dict[str, str] = {}
    for k in range(90):  # 2026-01-01 .. 2026-03-31
        when = start + timedelta(days=k)
        m = point_at(repo, img, when)
        content[m.backup_id] = img.read_bytes()
        day_of[m.backup_id] = when.strftime("%m-%d")
        evolve(img, rng, 2, CS)
    # what the rules must keep, worked out by hand: Mar 25..31 (daily 7); ISO weeks
    # of Mar 30, 23, 16, 9 -> Mar 31, 29, 22, 15 (weekly 4); Mar 31, Feb 28, Jan 31
    want = {f"03-{d}" for d in range(25, 32)} | {"03-22", "03-15", "02-28", "01-31"}

    # chunks only removed points use: what prune must free at least
    idx = repo.chunk_index()
    ids_of: dict[str, set[bytes]] = {}
    for bid in content:
        di = repo.load_index(bid, "disk0")
        ids_of[bid] = {bytes(x) for x in di.ids if x.any()}
    keep_ids = set().union(*(ids_of[b] for b in content if day_of[b] in want))
    gone_ids = set().union(*(ids_of[b] for b in content if day_of[b] not in want)) - keep_ids
    gone_bytes = sum(idx.candidates(c)[0].stored_len for c in gone_ids)
    assert gone_bytes > 100 * CS // 2  # most random chunks compress to nothing less

    dry = forget(repo, policy=Policy(daily=7, weekly=4, monthly=3), dry_run=True,
                 then_prune=True)
    assert {day_of[d.point.backup_id] for d in dry.kept} == want
    assert dry.prune is not None and dry.prune.dry_run
    assert len(repo.list_backups()) == 90  # the dry run changed nothing

    res = forget(repo, policy=Policy(daily=7, weekly=4, monthly=3), then_prune=True)
    kept = {d.point.backup_id: d.reasons for d in res.kept}
    assert {day_of[b] for b in kept} == want
    by_day = {day_of[b]: r for b, r in kept.items()}
    assert by_day["03-31"] == ["daily", "weekly", "monthly"]
    assert by_day["03-22"] == ["weekly"] and by_day["01-31"] == ["monthly"]
    assert {m.backup_id for m in repo.list_backups()} == set(kept)
    assert len(res.removed) == 79
    rep = res.prune
    assert rep is not None and not rep.problems
    assert rep.bytes_freed >= gone_bytes
    # the dry run's estimate: packs only (index files are rewritten too)
    est = dry.prune.bytes_freed
    assert est >= gone_bytes and abs(rep.bytes_freed - est) <= 96 * 1024, (est, rep)
    assert rep.bytes_freed <= rep.unreferenced_bytes_before + 4096 * rep.index_files_before
    after = repo.chunk_index(types=(TYPE_CHUNK,))
    assert not any(after.contains(c) for c in list(gone_ids)[:200])
    for bid in kept:
        assert restores_identical(repo, bid, content[bid], tmp_path), bid
    assert read_data_ok(repo) == []


def _cli(*args: str, repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapferry", *args, "--repo", str(repo)],
                          capture_output=True, text=True, timeout=120)


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size)
                  for p in root.rglob("*") if p.is_file())


def test_cli_forget_dry_run_table_json_and_errors(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    img = tmp_path / "disk.img"
    rng = random.Random(3)
    img.write_bytes(rng.randbytes(4 * CS))
    ids = []
    for k in range(4):
        ids.append(point_at(repo, img, datetime(2026, 5, 1 + k, 8, tzinfo=UTC),
                            vm="a" if k % 2 else "b").backup_id)
        evolve(img, rng, 1, CS)
    before = _listing(repo.path)
    r = _cli("forget", "--keep-last", "1", "--dry-run", repo=repo.path)
    assert r.returncode == 0, r.stderr
    assert _listing(repo.path) == before
    lines = r.stdout.splitlines()
    assert any(ids[3] in ln and "keep" in ln and "last" in ln for ln in lines)
    assert any(ids[1] in ln and "remove" in ln for ln in lines)
    assert "would remove 2 restore point(s), kept 2" in r.stdout  # per VM: a and b
    r = _cli("forget", "--keep-last", "1", "--vm", "a", "--json", repo=repo.path)
    doc = json.loads(r.stdout)
    acts = {p["backup_id"]: p["action"] for p in doc["restore_points"]}
    assert acts == {ids[3]: "keep", ids[1]: "remove"}
    assert {m.backup_id for m in repo.list_backups()} == {ids[0], ids[2], ids[3]}
    r = _cli("forget", ids[0], "--prune", repo=repo.path)
    assert r.returncode == 0, r.stderr
    assert "removed 1 restore point(s)" in r.stdout and "free " in r.stdout
    for argv, code in (
        (("forget",), 2), (("forget", "--keep-daily", "-5"), 2),
        (("forget", "--keep-within", "7x"), 2), (("forget", ids[2], "--keep-last", "1"), 2),
        (("forget", "20990101T000000Z-00000000"), 1), (("prune", "--max-unused", "150"), 2),
    ):
        r = _cli(*argv, repo=repo.path)
        assert r.returncode == code, (argv, r.stdout, r.stderr)
        assert r.stderr.startswith("snapferry: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert {m.backup_id for m in repo.list_backups()} == {ids[2], ids[3]}


def test_forget_removes_a_damaged_manifest_only_when_named(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    img = tmp_path / "disk.img"
    img.write_bytes(np.random.default_rng(1).bytes(2 * CS))
    good = point_at(repo, img, datetime(2026, 1, 1, tzinfo=UTC)).backup_id
    repo.backend.save("snapshots", "20260102T000000Z-badbadba", b"{not json")
    res = forget(repo, policy=Policy(last=5))
    assert res.removed == [] and [n for n, _w, _r in res.damaged] == ["20260102T000000Z-badbadba"]
    res = forget(repo, backup_ids=["20260102T000000Z-badbadba"])
    assert res.removed == ["20260102T000000Z-badbadba"]
    assert [m.backup_id for m in repo.list_backups()] == [good]
