"""Backup planning: which restore point a backup chains to, and what each disk reads.

One module owns every decision that used to be spread over the CLI, the coordinator
and the backup session:

* **Series and parent** (``choose_parent``): a restore-point series is named by
  ``--name`` or, for images, by the source's identity (``source_identity``); the parent
  is the explicit ``--parent`` or the latest restore point of the series, and only one
  whose recorded identity equals this source's (a change of source within a series is
  a full backup with a warning, never an incremental of another disk).
* **Per disk, full or incremental** (``disk_full_reason``): no parent entry, a changed
  virtual size, or a parent whose changed-block audit failed (the tracker lied: the
  next backup reads the disk fully and starts a fresh tracker) make a disk full.
* **Extents → work** (``plan_runs``): byte ranges from an allocation map or a
  changed-block map become sorted, merged chunk runs ``(first, count)``; an
  incremental's index starts as the parent's.
* **CBT audit** (``plan_audit``, ``AuditPlan``): a share of the chunks the tracker
  calls clean (uniformly at random, plus chunks next to dirty runs) is read and id'd
  like any other chunk and compared with the parent's ids.

Inputs and outputs are typed values (manifests, sources, dataclasses), never argparse
namespaces: the CLI and the coordinator both call in here.
"""

from __future__ import annotations

import ipaddress
import math
import random
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from snapferry.engine.errors import SnapferryError, UsageError
from snapferry.engine.hypervisor import BackupMode, DiskPlan, ParentDisk
from snapferry.engine.source import DiskSource
from snapferry.engine.store.index import DiskIndex, chunk_count
from snapferry.engine.store.manifest import DiskEntry, Manifest
from snapferry.engine.store.repo import Repository

Run = tuple[int, int]  # (first chunk index, number of chunks)

DEFAULT_AUDIT_PERCENT = 1.0
PLAIN_DISK_NAME = "disk"  # the one disk of a file or NBD backup
_LOCAL_SCHEMES = ("nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")


# ---------------------------------------------------------------------------------------
# identity of a source
# ---------------------------------------------------------------------------------------


def host_name() -> str:
    return socket.gethostname() or "localhost"


def _host_local(uri: str) -> bool:
    parts = urlsplit(uri)
    if parts.scheme.lower() in _LOCAL_SCHEMES:
        return True
    host = (parts.hostname or "").lower()
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def source_identity(desc: dict[str, Any]) -> str:
    """The identity of an image source from its ``describe()``: ``HOST:/abs/path`` for a
    file or block device; the NBD URI (secrets removed) for an NBD export, prefixed with
    ``HOST:`` when the address only means something on this host (unix socket, vsock,
    loopback)."""
    kind = desc.get("kind")
    path = desc.get("path")
    if kind in ("file", "image") and isinstance(path, str) and path:
        return f"{host_name()}:{path}"  # an image of any format: its file is its identity
    uri = desc.get("uri")
    if isinstance(uri, str) and uri:
        return f"{host_name()}:{uri}" if _host_local(uri) else uri
    raise SnapferryError(f"cannot tell the identity of a {kind} source")


def vm_identity(meta: dict[str, Any], name: str) -> str:
    """The identity of a VM from ``VmInfo.meta``: its UUID where the hypervisor has one
    (vSphere instance UUID, QEMU ``-uuid``), else ``HOST:`` + the QMP socket path; the
    VM's name as the last resort (a backend that reports neither)."""
    hv = meta.get("hypervisor")
    uuid = meta.get("instance_uuid") or meta.get("uuid")
    if isinstance(uuid, str) and uuid.strip("0-"):
        return f"{hv or 'vm'}:uuid:{uuid}"
    qmp = meta.get("qmp_socket")
    if isinstance(qmp, str) and qmp:
        return f"{host_name()}:qemu+unix://{qmp}"
    return f"{hv or 'vm'}:name:{name}"


# ---------------------------------------------------------------------------------------
# the parent restore point
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesRequest:
    """What the caller asks for: the series name, the source's identity (None: not
    checked), ``--mode`` and ``--parent``."""

    name: str
    identity: str | None = None
    mode: BackupMode = "auto"
    parent_id: str | None = None


@dataclass
class ParentChoice:
    """The restore point to chain to (None: full backup) and why there is none."""

    parent: Manifest | None
    warnings: list[str] = field(default_factory=list)


def choose_parent(repo: Repository, req: SeriesRequest) -> ParentChoice:
    """``--mode full``: none. ``--parent ID``: that restore point (it must belong to the
    series; another identity is warned about but taken: the operator named it). Else the
    latest of the series, dropped with a warning when its recorded identity differs from
    ``req.identity`` (the source changed within the series). ``--mode incremental``
    without a usable parent is refused."""
    if req.mode == "full":
        return ParentChoice(None)
    if req.parent_id is not None:
        parent: Manifest | None = repo.load_manifest(req.parent_id)
        if parent is not None and parent.vm != req.name:
            raise UsageError(
                f"--parent {req.parent_id} is a restore point of {parent.vm!r}, not {req.name!r}"
            )
    else:
        parent = repo.latest(req.name)
    warnings: list[str] = []
    if parent is not None and req.identity is not None:
        before = manifest_identity(parent)
        if before is not None and before != req.identity:
            if req.parent_id is not None:
                # asked for by id: the operator vouches that it is the same disk (two
                # exports of one disk, a moved image); said, and done
                warnings.append(
                    f"--parent {req.parent_id} was made from another source ({before}, "
                    f"now {req.identity}): chaining to it as asked"
                )
            else:
                warnings.append(
                    f"the source of {req.name!r} changed (was {before}, now "
                    f"{req.identity}): full backup"
                )
                parent = None
    if req.mode == "incremental" and parent is None:
        why = f" ({warnings[0]})" if warnings else ""
        raise UsageError(
            f"--mode incremental needs an earlier restore point of {req.name!r} from the same "
            f"source{why}: run a full backup first (--mode full or auto)"
        )
    return ParentChoice(parent, warnings)


def manifest_identity(m: Manifest) -> str | None:
    """The source identity a restore point recorded (None for restore points made
    before identities were recorded)."""
    ident = m.identity
    return ident if isinstance(ident, str) and ident else None


# ---------------------------------------------------------------------------------------
# per disk: full or incremental
# ---------------------------------------------------------------------------------------


def audit_failed(entry: DiskEntry) -> int:
    """How many audited chunks of this parent disk differed (0: none or no audit)."""
    a = entry.cbt_audit
    if isinstance(a, dict):
        n = a.get("mismatched", 0)
        return n if isinstance(n, int) and not isinstance(n, bool) else 0
    return 0


def disk_full_reason(parent: Manifest | None, name: str, size: int) -> str | None:
    """Why disk ``name`` (of ``size`` bytes now) cannot be an incremental of ``parent``'s
    entry; None when it can (given a changed-block map)."""
    if parent is None:
        return None
    try:
        entry = parent.disk(name)
    except KeyError:
        return f"no earlier restore point of disk {name}"
    if entry.virtual_size != size:
        return f"the disk's size changed ({entry.virtual_size} -> {size} bytes)"
    bad = audit_failed(entry)
    if bad:
        return (
            f"the changed-block audit of restore point {parent.backup_id} found {bad} chunk(s) "
            "the tracker had missed: full read with a fresh tracker"
        )
    return None


@dataclass
class DiskInput:
    """One disk to back up, as the backup session takes it. ``changed`` None: a full
    copy (allocated, non-zero extents); else the changed byte ranges since the parent."""

    name: str
    source: DiskSource
    changed: list[tuple[int, int]] | None = None
    tracking: dict[str, Any] = field(default_factory=dict)
    full_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def review_disks(
    parent: Manifest | None, disks: Iterable[DiskInput]
) -> tuple[list[DiskInput], list[str]]:
    """Apply the per-disk rules on top of what a hypervisor (or a bitmap) proposed: a
    disk proposed as incremental becomes full when ``disk_full_reason`` says so (the
    backend may not know about audits or sizes). Returns the disks and warnings."""
    out: list[DiskInput] = []
    warnings: list[str] = []
    for d in disks:
        if d.changed is not None:
            why = disk_full_reason(parent, d.name, d.source.size)
            if parent is None:
                why = "no earlier restore point to chain to"
            if why is not None:
                d.changed = None
                d.full_reason = why
                warnings.append(_disk_says(d.name, why))
        elif d.full_reason and parent is not None:
            warnings.append(_disk_says(d.name, d.full_reason))
        out.append(d)
    return out, warnings


def _disk_says(name: str, text: str) -> str:
    prefix = f"disk {name}: "
    said = text.startswith(prefix) or text.startswith(f"disk {name} ")  # "disk X is raw: ..."
    return text if said else prefix + text


def parent_disks(parent: Manifest | None) -> dict[str, ParentDisk]:
    """What a hypervisor backend needs of the parent's disks to chain an incremental."""
    if parent is None:
        return {}
    return {d.name: ParentDisk(d.name, d.virtual_size, dict(d.tracking)) for d in parent.disks}


def from_plans(plans: Iterable[DiskPlan]) -> list[DiskInput]:
    return [DiskInput(p.name, p.source, p.changed, dict(p.tracking), p.full_reason,
                      dict(p.meta)) for p in plans]


def chains(parent: Manifest | None, disks: Iterable[DiskInput]) -> Manifest | None:
    """The parent the restore point records: only when at least one disk is an
    incremental (a backup that reads every disk fully is a full backup)."""
    if parent is None:
        return None
    return parent if any(d.changed is not None for d in disks) else None


def plan_plain_disk(
    parent: Manifest | None, source: DiskSource, bitmap: str | None
) -> DiskInput:
    """The one disk of a file or NBD backup: a dirty-bitmap incremental when ``bitmap``
    is given and the parent's entry allows it, else a full read of allocated data."""
    if bitmap is None:
        resized = None
        if parent is not None and PLAIN_DISK_NAME in parent.disk_names:
            before = parent.disk(PLAIN_DISK_NAME).virtual_size
            if before != source.size:
                resized = f"the disk's size changed ({before} -> {source.size} bytes)"
        return DiskInput(PLAIN_DISK_NAME, source, None, full_reason=resized)
    tracking = {"bitmap": bitmap}
    if parent is None:
        return DiskInput(PLAIN_DISK_NAME, source, None, tracking)
    why = disk_full_reason(parent, PLAIN_DISK_NAME, source.size)
    if why is not None:
        return DiskInput(PLAIN_DISK_NAME, source, None, tracking, full_reason=why)
    changed = [(e.offset, e.length) for e in source.extents(0, source.size, dirty=True)
               if e.dirty]
    return DiskInput(PLAIN_DISK_NAME, source, changed, tracking)


def check_incremental(mode: BackupMode, disks: Iterable[DiskInput],
                      parent: Manifest | None) -> None:
    """``--mode incremental`` is refused unless every disk is an incremental."""
    if mode != "incremental":
        return
    if parent is None:
        raise UsageError(
            "--mode incremental needs an earlier restore point of this source: run a full "
            "backup first (--mode full or auto)"
        )
    fulls = [d for d in disks if d.changed is None]
    if fulls:
        reasons = "; ".join(f"{d.name}: {d.full_reason or 'no change tracking'}" for d in fulls)
        raise UsageError(
            f"cannot make an incremental backup ({reasons}): use --mode full or --mode auto"
        )


@dataclass
class PlainPlan:
    """A file or NBD backup, planned: series name, identity, the disk, the parent the
    restore point chains to (None: full) and warnings to show."""

    name: str
    identity: str
    disk: DiskInput
    parent: Manifest | None
    warnings: list[str]


def plan_plain_backup(
    repo: Repository,
    source: DiskSource,
    *,
    name: str | None,
    bitmap: str | None,
    mode: BackupMode,
    parent_id: str | None,
) -> PlainPlan:
    """Everything a file / NBD backup decides before copying (see the module doc)."""
    identity = source_identity(source.describe())
    series = name or identity
    choice = choose_parent(repo, SeriesRequest(series, identity, mode, parent_id))
    if mode == "incremental" and bitmap is None:
        raise UsageError(
            f"--mode incremental needs a changed-block map: {series!r} has none "
            "(a plain file, or an NBD export without --bitmap); every backup of it is full"
        )
    disk = plan_plain_disk(choice.parent, source, bitmap)
    disks, warnings = review_disks(choice.parent, [disk])
    check_incremental(mode, disks, choice.parent)
    return PlainPlan(series, identity, disks[0], chains(choice.parent, disks),
                     choice.warnings + warnings)


# ---------------------------------------------------------------------------------------
# extents → chunk runs
# ---------------------------------------------------------------------------------------


def merge_runs(ranges: Iterable[tuple[int, int]], chunk_size: int, size: int) -> list[Run]:
    """Byte ranges ``(offset, length)`` → sorted, merged chunk runs ``(first, count)``,
    rounded out to whole chunks and clipped to a disk of ``size`` bytes."""
    n_chunks = -(-size // chunk_size)
    spans: list[tuple[int, int]] = []
    for off, length in ranges:
        if length <= 0:
            continue
        if off < 0:
            raise SnapferryError(f"changed range at negative offset {off}")
        first = off // chunk_size
        last = min(-(-(off + length) // chunk_size), n_chunks)
        if first < last:
            spans.append((first, last))
    spans.sort()
    runs: list[Run] = []
    for first, last in spans:
        if runs and first <= runs[-1][0] + runs[-1][1]:
            f0, c0 = runs[-1]
            runs[-1] = (f0, max(c0, last - f0))
        else:
            runs.append((first, last - first))
    return runs


def allocated_ranges(source: DiskSource, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of ``source`` in ``[offset, offset+length)`` that are not known zero."""
    if length <= 0:
        return
    for e in source.extents(offset, length, dirty=False):
        if not e.zero:
            yield (e.offset, e.length)


def run_bytes(runs: list[Run], chunk_size: int, size: int) -> int:
    total = 0
    for first, count in runs:
        total += min((first + count) * chunk_size, size) - first * chunk_size
    return total


def runs_mask(runs: Iterable[Run], n_chunks: int) -> np.ndarray:
    mask = np.zeros(n_chunks, dtype=bool)
    for first, count in runs:
        mask[first : first + count] = True
    return mask


def mask_runs(mask: np.ndarray) -> list[Run]:
    """A boolean chunk mask → runs ``(first, count)`` of its True stretches."""
    if mask.size == 0:
        return []
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def plan_full(
    source: DiskSource, chunk_size: int, *, page_entries: int | None = None
) -> tuple[DiskIndex, list[Run]]:
    """A full copy: an empty index and every allocated, non-zero range."""
    size = source.size
    runs = merge_runs(allocated_ranges(source, 0, size), chunk_size, size)
    if page_entries is None:
        return DiskIndex.empty(size, chunk_size), runs
    return DiskIndex.empty(size, chunk_size, page_entries=page_entries), runs


def plan_incremental(
    source: DiskSource, changed: Iterable[tuple[int, int]], parent_index: DiskIndex
) -> tuple[DiskIndex, list[Run]]:
    """An incremental: the parent's index with the changed ranges (rounded out to chunks)
    to re-read; a resized disk also re-reads the old last chunk and everything allocated
    beyond it (a bitmap need not cover the grown area)."""
    cs = parent_index.chunk_size
    size = source.size
    ranges = list(changed)
    if parent_index.virtual_size != size:
        start = (min(parent_index.virtual_size, size) // cs) * cs
        ranges.extend(allocated_ranges(source, start, size - start))
        index = parent_index.resized(size)
    else:
        index = parent_index.copy()
    return index, merge_runs(ranges, cs, size)


# ---------------------------------------------------------------------------------------
# the CBT audit
# ---------------------------------------------------------------------------------------


@dataclass
class AuditPlan:
    """The clean chunks of one disk to read and compare with the parent's ids.

    ``chunks``: sorted chunk indexes (uniform sample + neighbours of dirty runs);
    ``expected``: the parent's ids of those chunks; ``allocated``: the disk's
    allocation map per chunk (used for a full read if the audit fails)."""

    chunks: np.ndarray
    expected: np.ndarray
    allocated: np.ndarray
    uniform: int
    neighbours: int
    population: int

    @property
    def sampled(self) -> int:
        return int(self.chunks.size)

    def mismatched(self, index: DiskIndex) -> int:
        if self.chunks.size == 0:
            return 0
        got = _ids_of(index, self.chunks)
        return int(np.count_nonzero((got != self.expected).any(axis=1)))


def _ids_of(index: DiskIndex, chunks: np.ndarray) -> np.ndarray:
    """The ids of ``chunks`` as a (k, 16) array, a page at a time (an index may be
    paged: a sample should not build the whole disk's id array, nor load a page once
    per chunk it holds — ``get`` does not keep the pages it loads)."""
    chunks = np.asarray(chunks, dtype=np.int64)
    out = np.zeros((chunks.size, 16), dtype=np.uint8)
    pe = index.page_entries
    pages = chunks // pe
    for p in _sorted_unique(pages).tolist():
        arr = index.page(int(p))
        if arr is not None:
            sel = pages == p
            out[sel] = arr[chunks[sel] - p * pe]
    return out


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-d integer array, without it: ``np.unique`` imports
    ``numpy.ma`` on first use (~20 ms of every incremental's start)."""
    a = np.sort(np.asarray(a).ravel())
    if a.size < 2:
        return a
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def allocated_mask(source: DiskSource, chunk_size: int) -> np.ndarray:
    n = chunk_count(source.size, chunk_size)
    return runs_mask(merge_runs(allocated_ranges(source, 0, source.size), chunk_size,
                                source.size), n)


def plan_audit(
    dirty: list[Run],
    parent_index: DiskIndex,
    allocated: np.ndarray,
    percent: float,
    rng: random.Random | None = None,
) -> AuditPlan:
    """Choose the audit sample of one disk.

    Population: the chunks the tracker calls clean that hold data in the parent or are
    allocated in the source now (a clean chunk that is a hole in both cannot hide a
    missed write, except a write of zeros over zeros, which changes nothing).

    * uniform: ``ceil(percent/100 * population)`` chunks drawn without replacement;
    * neighbours: the clean chunk just before and just after each dirty run, where
      trackers err most (granularity and off-by-one mistakes), at most as many as the
      uniform sample plus two (chosen at random when there are more), so the audit never
      reads more than about twice its share.
    """
    n = len(parent_index)
    dirty_mask = runs_mask(dirty, n)
    pop_mask = ~dirty_mask & (parent_index.nonzero_mask() | allocated[:n])
    population = int(np.count_nonzero(pop_mask))
    rng = rng or random.Random()
    empty = np.zeros(0, dtype=np.int64)
    if percent <= 0 or population == 0:
        return AuditPlan(empty, _ids_of(parent_index, empty), allocated, 0, 0, population)
    want = min(population, math.ceil(population * min(percent, 100.0) / 100.0))
    cand = np.flatnonzero(pop_mask)
    uniform = np.sort(np.array(rng.sample(range(cand.size), want), dtype=np.int64))
    picked = cand[uniform] if want else empty
    near: set[int] = set()
    for first, count in dirty:
        for c in (first - 1, first + count):
            if 0 <= c < n and pop_mask[c]:
                near.add(c)
    near -= set(picked.tolist())
    cap = want + 2
    near_list = sorted(near)
    if len(near_list) > cap:
        near_list = sorted(rng.sample(near_list, cap))
    chunks = _sorted_unique(np.concatenate([picked, np.array(near_list, dtype=np.int64)]))
    return AuditPlan(
        chunks=chunks,
        expected=_ids_of(parent_index, chunks),
        allocated=allocated,
        uniform=int(picked.size),
        neighbours=len(near_list),
        population=population,
    )


def miss_probability(population: int, sampled: int, missed: int) -> float:
    """Chance that a uniform sample of ``sampled`` out of ``population`` clean chunks
    contains none of ``missed`` chunks the tracker wrongly called clean:
    C(N-k, n) / C(N, n) (hypergeometric), about (1 - n/N)^k."""
    if missed <= 0:
        return 1.0
    if sampled + missed > population:
        return 0.0
    p = 1.0
    for i in range(missed):
        p *= (population - sampled - i) / (population - i)
    return p


@dataclass
class AuditHistory:
    """The changed-block audits of one restore-point series, oldest first."""

    series: str
    audited: int = 0  # restore points with at least one audited disk
    sampled: int = 0
    mismatched: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)  # backup_id, disk, counts

    def to_json(self) -> dict[str, Any]:
        return {"series": self.series, "audited": self.audited, "sampled": self.sampled,
                "mismatched": self.mismatched, "failures": self.failures}

    def summary(self) -> str:
        if not self.failures:
            return (f"cbt audit {self.series}: {self.audited} restore point(s) audited, "
                    f"{self.sampled} clean chunk(s) sampled, no mismatch")
        bad = ", ".join(f"{f['backup_id']} ({f['disk']}: {f['mismatched']} of "
                        f"{f['sampled']})" for f in self.failures)
        return (f"cbt audit {self.series}: {self.audited} restore point(s) audited; the "
                f"tracker missed writes in {len(self.failures)}: {bad} (each was read "
                "fully)")


def audit_history(manifests: Iterable[Manifest]) -> list[AuditHistory]:
    """Per series (in first-seen order), what the audits of its restore points found."""
    out: dict[str, AuditHistory] = {}
    for m in manifests:
        h = out.setdefault(m.vm, AuditHistory(m.vm))
        seen = False
        for d in m.disks:
            a = d.cbt_audit
            if not isinstance(a, dict):
                continue
            seen = True
            h.sampled += int(a.get("sampled", 0))
            bad = int(a.get("mismatched", 0))
            h.mismatched += bad
            if bad:
                h.failures.append({"backup_id": m.backup_id, "disk": d.name,
                                   "sampled": int(a.get("sampled", 0)), "mismatched": bad})
        h.audited += seen
    return [h for h in out.values() if h.audited]


def full_read_runs(plan: AuditPlan, read: np.ndarray) -> list[Run]:
    """After a failed audit: every allocated chunk not read yet."""
    return mask_runs(plan.allocated & ~read)


__all__ = [
    "DEFAULT_AUDIT_PERCENT",
    "PLAIN_DISK_NAME",
    "AuditHistory",
    "AuditPlan",
    "DiskInput",
    "ParentChoice",
    "PlainPlan",
    "SeriesRequest",
    "allocated_mask",
    "allocated_ranges",
    "audit_history",
    "chains",
    "check_incremental",
    "choose_parent",
    "disk_full_reason",
    "from_plans",
    "full_read_runs",
    "manifest_identity",
    "mask_runs",
    "merge_runs",
    "miss_probability",
    "parent_disks",
    "plan_audit",
    "plan_full",
    "plan_incremental",
    "plan_plain_backup",
    "plan_plain_disk",
    "review_disks",
    "run_bytes",
    "runs_mask",
    "source_identity",
    "vm_identity",
]
