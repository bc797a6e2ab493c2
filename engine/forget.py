"""``forget``: remove restore points by id or by a retention policy (engine/retention.py).

A restore point is removed by removing its manifest: one atomic step; its blobs stay
until ``prune``. Forget holds the exclusive role (docs/FORMAT.md, D1) unless it only
plans (``dry_run``); with ``then_prune`` the prune runs under the same lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snapferry.engine.errors import RepositoryError, UsageError
from snapferry.engine.retention import Decision, Point, Policy, parse_created, plan_forget
from snapferry.engine.store import prune as prune_mod
from snapferry.engine.store.repo import Repository


@dataclass
class ForgetResult:
    dry_run: bool
    policy: str
    decisions: list[Decision] = field(default_factory=list)
    damaged: list[tuple[str, str, bool]] = field(default_factory=list)
    """(backup id, why it does not parse, removed?) of manifests that do not parse."""
    removed: list[str] = field(default_factory=list)
    prune: prune_mod.PruneReport | None = None

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.keep]

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "policy": self.policy,
            "restore_points": [
                {
                    "backup_id": d.point.backup_id,
                    "vm": d.point.group,
                    "created": d.point.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "action": "keep" if d.keep else "remove",
                    "reasons": d.reasons,
                }
                for d in self.decisions
            ],
            "damaged": [
                {"backup_id": n, "problem": why, "action": "remove" if rm else "keep"}
                for n, why, rm in self.damaged
            ],
            "removed": self.removed,
            "prune": self.prune.to_json() if self.prune is not None else None,
        }


def forget(
    repo: Repository,
    *,
    policy: Policy | None = None,
    backup_ids: list[str] | None = None,
    vm: str | None = None,
    dry_run: bool = False,
    then_prune: bool = False,
    max_unused: float = prune_mod.DEFAULT_MAX_UNUSED,
) -> ForgetResult:
    """Remove the restore points ``backup_ids`` names, or those ``policy`` does not keep
    (per VM; only ``vm``'s with ``vm``). Returns what was (or would be) done."""
    ids = list(backup_ids or [])
    if policy is not None:
        policy.check()
    if ids and policy is not None and not policy.empty():
        raise UsageError("give either backup ids or --keep-* options, not both")
    if not ids and (policy is None or policy.empty()):
        raise UsageError(
            "forget needs backup ids or a policy (--keep-last, --keep-daily, ...); "
            "with none it would remove nothing"
        )
    result = ForgetResult(dry_run=dry_run, policy=policy.describe() if policy else "by id")
    if dry_run:
        _plan(repo, policy, ids, vm, result)
        if then_prune:
            gone = frozenset(d.point.backup_id for d in result.decisions if not d.keep) | {
                n for n, _w, rm in result.damaged if rm}
            result.prune = prune_mod.prune(repo, max_unused=max_unused, dry_run=True,
                                           without=gone)
        return result
    with prune_mod.exclusive(repo, "forget") as lock:
        _plan(repo, policy, ids, vm, result)
        for d in result.decisions:
            if not d.keep:
                repo.backend.remove("snapshots", d.point.backup_id)
                result.removed.append(d.point.backup_id)
        for name, _why, rm in result.damaged:
            if rm:
                repo.backend.remove("snapshots", name)
                result.removed.append(name)
        if then_prune:
            result.prune = prune_mod.prune(repo, max_unused=max_unused, lock_name=lock)
    return result


def _plan(repo: Repository, policy: Policy | None, ids: list[str], vm: str | None,
          result: ForgetResult) -> None:
    scan = repo.scan()
    points: list[Point] = []
    for m in scan.manifests:
        if vm is not None and m.vm != vm:
            continue
        try:
            created = parse_created(m.created)
        except ValueError:
            result.damaged.append((m.backup_id, f"created {m.created!r} is not a time",
                                   m.backup_id in ids))
            continue
        points.append(Point(m.backup_id, m.vm, created))
    named = set(ids)
    for name, why in scan.bad:
        result.damaged.append((name, why, name in named))
    known = {p.backup_id for p in points} | {n for n, _w, _r in result.damaged}
    unknown = [i for i in ids if i not in known]
    if unknown:
        where = f" of VM {vm}" if vm is not None else ""
        raise RepositoryError(
            f"no restore point{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{where} "
            f"in {repo.backend.location}"
        )
    result.decisions = plan_forget(points, policy if not ids else None, ids)
