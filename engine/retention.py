"""Retention policies: which restore points ``forget`` keeps, and why.

The calendar semantics are restic's (docs/RETENTION.md has examples). Restore points
are grouped (by VM name); inside a group they are walked newest first and:

* ``last N``: the N newest points are kept;
* ``hourly/daily/weekly/monthly/yearly N``: each point opens a *bucket* (its hour,
  day, ISO week, month or year, in UTC); the newest point of each of the N newest
  buckets that hold a point is kept. Buckets without points do not count;
* ``within D``: every point created within D before the group's *newest* point is kept
  (not before "now": a VM whose backups stopped keeps its last ones).

A count of -1 means "every bucket". A point is kept when any rule keeps it; its reasons
list every rule that did. Points named explicitly are removed whatever the policy.
Nothing here touches a repository: it is pure and its clock is the points' own times.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from snapferry.engine.errors import UsageError

UNLIMITED = -1


@dataclass(frozen=True, slots=True)
class Duration:
    """A calendar duration as restic writes it: ``1y2m3d4h`` (years, months, days, hours)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def before(self, t: datetime) -> datetime:
        """``t`` minus this duration (months and years by the calendar, clamped to the
        month's last day)."""
        month0 = t.year * 12 + (t.month - 1) - self.years * 12 - self.months
        year, month = divmod(month0, 12)
        month += 1
        day = min(t.day, _days_in_month(year, month))
        shifted = t.replace(year=year, month=month, day=day)
        return shifted - timedelta(days=self.days, hours=self.hours)

    def __str__(self) -> str:
        parts = [(self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")]
        return "".join(f"{n}{u}" for n, u in parts if n) or "0h"


_DURATION_RE = re.compile(r"(\d+)([ymdh])")


def parse_duration(text: str) -> Duration:
    """``"7d"``, ``"1y6m"``, ``"36h"`` -> ``Duration``; ``UsageError`` otherwise."""
    s = text.strip()
    pos = 0
    got: dict[str, int] = {}
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos or m.group(2) in got:
            break
        got[m.group(2)] = int(m.group(1))
        pos = m.end()
    if not s or pos != len(s):
        raise UsageError(
            f"not a duration: {text!r} (numbers with units y, m, d, h, e.g. 7d, 1y6m, 36h)"
        )
    return Duration(got.get("y", 0), got.get("m", 0), got.get("d", 0), got.get("h", 0))


def _days_in_month(year: int, month: int) -> int:
    nxt = datetime(year + month // 12, month % 12 + 1, 1)
    return (nxt - timedelta(days=1)).day


@dataclass(frozen=True, slots=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None

    def empty(self) -> bool:
        return not any(
            (self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly)
        ) and self.within is None

    def check(self) -> None:
        for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            n = getattr(self, name)
            if n < UNLIMITED:
                raise UsageError(f"--keep-{name} must be a count >= 0 (or -1 for all), not {n}")

    def describe(self) -> str:
        parts = [f"{n} {name}" for name in ("last", "hourly", "daily", "weekly", "monthly",
                                              "yearly") if (n := getattr(self, name))]
        if self.within is not None:
            parts.append(f"within {self.within}")
        return ", ".join(parts) or "none"


@dataclass(frozen=True, slots=True)
class Point:
    """What retention needs of a restore point."""

    backup_id: str
    group: str
    created: datetime


@dataclass
class Decision:
    point: Point
    keep: bool
    reasons: list[str] = field(default_factory=list)


BucketFn = Callable[[datetime], tuple[int, ...]]
_BUCKETS: tuple[tuple[str, str, BucketFn], ...] = (
    ("hourly", "hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", "daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", "weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("monthly", "monthly", lambda t: (t.year, t.month)),
    ("yearly", "yearly", lambda t: (t.year,)),
)


def parse_created(text: str) -> datetime:
    """A manifest's ``created`` (ISO 8601, ``Z`` or an offset) as an aware UTC datetime."""
    t = datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC)


def apply_policy(points: Sequence[Point], policy: Policy) -> list[Decision]:
    """Decisions for the points of *one* group, newest first."""
    ordered = sorted(points, key=lambda p: (p.created, p.backup_id), reverse=True)
    out = [Decision(p, False) for p in ordered]
    if not out:
        return out
    left = {name: getattr(policy, name) for name, _l, _f in _BUCKETS}
    last_left = policy.last
    seen: dict[str, tuple[int, ...] | None] = {name: None for name, _l, _f in _BUCKETS}
    newest = ordered[0].created
    cutoff = policy.within.before(newest) if policy.within is not None else None
    for d in out:
        t = d.point.created
        if last_left != 0:
            d.reasons.append("last")
            last_left -= 1
        for name, label, fn in _BUCKETS:
            if left[name] == 0:
                continue
            b = fn(t)
            if b != seen[name]:
                seen[name] = b
                d.reasons.append(label)
                if left[name] > 0:
                    left[name] -= 1
        if cutoff is not None and t >= cutoff:
            d.reasons.append(f"within {policy.within}")
        d.keep = bool(d.reasons)
    return out


def plan_forget(
    points: Sequence[Point], policy: Policy | None, explicit: Sequence[str] = ()
) -> list[Decision]:
    """Decisions for every point: the policy applied per group, then explicit ids
    removed. Ordered by group, newest first."""
    named = set(explicit)
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.group, []).append(p)
    out: list[Decision] = []
    for g in sorted(groups):
        if policy is not None and not policy.empty():
            decisions = apply_policy(groups[g], policy)
        else:
            decisions = [
                Decision(p, True, ["not named"])
                for p in sorted(groups[g], key=lambda p: (p.created, p.backup_id), reverse=True)
            ]
        for d in decisions:
            if d.point.backup_id in named:
                d.keep = False
                d.reasons = []
        out.extend(decisions)
    return out
