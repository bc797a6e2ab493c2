"""``prune``: reclaim the space of forgotten restore points and of dead writers.

The deleter of docs/FORMAT.md (*Deleters*, rules D1..D6). In order:

1. take the exclusive role (D1; ``--dry-run`` takes none and changes nothing);
2. list manifests, index files and packs; load the chunk index;
3. **mark**: every page a manifest names and every chunk those pages name; one copy
   of each (an undamaged one in a present pack) is *chosen*; a blob found nowhere
   stops prune before it deletes anything (D2). Packs no index file names are read
   through their trailer: one holding the only copy of a marked blob is re-indexed;
4. plan per pack: nothing chosen -> delete; unused share above ``max_unused`` ->
   repack; else keep;
5. **repack**: copy the chosen blobs (each checked: CRC, decode, id, BLAKE3) into new
   packs, each saved before its own index file;
6. **index**: write index files naming every entry of every kept pack, then sync;
7. remove the old index files (D3: an index file naming a pack to delete goes before
   the pack, so no index entry ever names a missing pack);
8. delete the packs; then temp files of dead processes and ``damaged`` objects whose
   packs are all gone.

A SIGKILL between any two steps leaves a repository whose every restore point reads
(its blobs stay indexed and present), and the next prune finishes the job. Memory:
sorted numpy arrays of ids (16 bytes each) and per-row flags, no Python sets of ids.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from snapferry.engine import faults
from snapferry.engine.errors import CorruptionError, RepositoryError, UsageError
from snapferry.engine.procs import process_alive
from snapferry.engine.store import locks
from snapferry.engine.store.backend import Backend, ObjectMissing
from snapferry.engine.store.blobs import ENTRY_DTYPE, ENTRY_SIZE, check_blob
from snapferry.engine.store.chunkindex import ChunkIndex, split_ids
from snapferry.engine.store.chunks import ChunkReader
from snapferry.engine.store.hashing import ID_SIZE
from snapferry.engine.store.manifest import Manifest, decode_pages
from snapferry.engine.store.pack import (
    PACK_FOOTER_SIZE,
    PACK_HEADER_SIZE,
    PackWriter,
    encode_index_file,
    read_pack_trailer,
)
from snapferry.engine.store.repo import Repository

DEFAULT_MAX_UNUSED = 5.0
"""Percent of a pack that may be unused before prune repacks it (restic's default)."""
INDEX_FILE_ENTRIES = 1 << 17
"""Entries per index file prune writes (9 MiB files)."""
TRACE_ENV = "SNAPFERRY_PRUNE_TRACE"
"""Measurement hook: non-empty prints the peak RSS at each step on stderr."""
STEPS = ("locked", "marked", "repack", "repacked", "indexed", "unindex", "unindexed",
         "delete", "deleted", "cleaned")

KeyArray = tuple[np.ndarray, np.ndarray]
"""Sorted unique ids as (hi, lo) uint64 arrays (big-endian halves)."""


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``: not inherited across exec, unlike
    ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


class _Faults:
    """The test fault point ``prune-kill=STEP[:N]`` (engine/faults.py) and the
    measurement trace."""

    def __init__(self) -> None:
        kill = faults.prune_kill()
        self.step, self.left = kill if kill is not None else ("", 0)
        self.trace = os.environ.get(TRACE_ENV, "") not in ("", "0")
        self.last_traced = ""
        if self.step and self.step not in STEPS:
            raise ValueError(f"prune-kill={self.step}: unknown step (steps: {', '.join(STEPS)})")

    def at(self, step: str) -> None:
        if self.trace and step != self.last_traced:
            import sys

            self.last_traced = step
            sys.stderr.write(f"prune step {step}: peak RSS {peak_rss_mib()} MiB\n")
        if step != self.step:
            return
        self.left -= 1
        if self.left <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class PruneReport:
    dry_run: bool
    restore_points: int = 0
    packs_before: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    packs_reindexed: int = 0
    blobs_referenced: int = 0
    blobs_copied: int = 0
    bytes_copied: int = 0
    index_files_before: int = 0
    index_files_removed: int = 0
    index_files_written: int = 0
    temp_files_removed: int = 0
    damaged_removed: int = 0
    bytes_before: int = 0
    """Bytes of packs and index files when prune started."""
    unreferenced_bytes_before: int = 0
    """Bytes of blobs no restore point uses, with their trailer entries, plus packs no
    index names; what a prune with ``max_unused`` 0 would free at most (before index
    and pack overheads)."""
    bytes_freed: int = 0
    """Packs, index files and temp files removed, minus packs and index files written."""
    bytes_after: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


# -- id arrays -------------------------------------------------------------------------------


def _sorted_unique(hi: np.ndarray, lo: np.ndarray) -> KeyArray:
    if not len(hi):
        return hi, lo
    order = np.lexsort((lo, hi))
    hi, lo = hi[order], lo[order]
    keep = np.ones(len(hi), dtype=bool)
    keep[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    return hi[keep], lo[keep]


def _member(keys: KeyArray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Boolean mask: (hi[i], lo[i]) is in the sorted unique ``keys``."""
    khi, klo = keys
    out = np.zeros(len(hi), dtype=bool)
    if not len(khi) or not len(hi):
        return out
    a = np.searchsorted(khi, hi, "left")
    b = np.searchsorted(khi, hi, "right")
    one = (b - a) == 1
    ai = np.minimum(a, len(khi) - 1)
    out[one] = klo[ai[one]] == lo[one]
    for k in np.flatnonzero((b - a) > 1).tolist():  # two ids sharing 64 bits: rare
        out[k] = bool((klo[int(a[k]) : int(b[k])] == lo[k]).any())
    return out


class _IdAccumulator:
    """Collects ids in chunks and folds them into one sorted unique array."""

    def __init__(self) -> None:
        self.keys: KeyArray = (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
        self._parts: list[KeyArray] = []
        self._pending = 0

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        hi, lo = split_ids(ids)
        nz = (hi != 0) | (lo != 0)  # NULL_ID is never stored
        self._parts.append((hi[nz], lo[nz]))
        self._pending += len(hi)
        if self._pending > 1 << 20:
            self.fold()

    def fold(self) -> KeyArray:
        if self._parts:
            hi = np.concatenate([self.keys[0], *(p[0] for p in self._parts)])
            lo = np.concatenate([self.keys[1], *(p[1] for p in self._parts)])
            self._parts.clear()
            self._pending = 0
            self.keys = _sorted_unique(hi, lo)
        return self.keys


def _keys_bytes(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """(hi, lo) -> (n, 16) uint8 ids."""
    out = np.empty((len(hi), 2), dtype=">u8")
    out[:, 0], out[:, 1] = hi, lo
    return out.view(np.uint8).reshape(-1, ID_SIZE)


# -- the plan --------------------------------------------------------------------------------


@dataclass
class _Plan:
    manifests: list[Manifest]
    index_files: dict[str, int]
    packs: dict[str, int]
    index: ChunkIndex
    chosen: np.ndarray  # bool per table row: the copy kept of a referenced blob
    referenced: int
    keep: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    repack: list[str] = field(default_factory=list)
    reindexed: list[str] = field(default_factory=list)
    bad_index_files: list[str] = field(default_factory=list)
    unreferenced_bytes: int = 0
    rewrite_index: bool = False
    repack_unused: int = 0
    trusted: np.ndarray | None = None  # per table row: agrees with its pack's trailer


def _mark(repo: Repository, index: ChunkIndex, manifests: list[Manifest]) -> KeyArray:
    """Sorted unique ids of every page and chunk the manifests reach."""
    pages = _IdAccumulator()
    for m in manifests:
        for d in m.disks:
            ids = [p for p in decode_pages(d.pages) if p is not None]
            if ids:
                pages.add(np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(-1, ID_SIZE))
    phi, plo = pages.fold()
    reader = ChunkReader(repo.backend, repo.seed, index)
    refs = _IdAccumulator()
    refs.add(_keys_bytes(phi, plo))
    raw_ids = _keys_bytes(phi, plo)
    for i in range(len(phi)):
        pid = raw_ids[i].tobytes()
        try:
            data = reader.read(pid)
        except RepositoryError as e:
            raise CorruptionError(
                f"prune stopped before deleting anything: index page {pid.hex()} cannot be "
                f"read ({e}); run snapferry verify"
            ) from None
        n = memoryview(data).nbytes
        if n % ID_SIZE:
            raise CorruptionError(f"index page {pid.hex()} has a partial entry")
        refs.add(np.frombuffer(bytes(data), dtype=np.uint8).reshape(-1, ID_SIZE))
    return refs.fold()


def trailer_agreement(backend: Backend, index: ChunkIndex, present: dict[str, int]) -> tuple[
    np.ndarray, dict[str, int]
]:
    """Per table row: False when the row's pack is present, its trailer reads, and the
    trailer has no entry at that offset with the same id, lengths, codec and digest (an
    index file that lies about a pack is never trusted over the pack itself). Also the
    count of such rows per pack."""
    t = index.table
    ok = np.ones(len(t), dtype=bool)
    bad: dict[str, int] = {}
    if not len(t):
        return ok, bad
    by_pack = np.argsort(t["pack"], kind="stable")
    packs_sorted = t["pack"][by_pack]
    for pno, pid in enumerate(index.packs):
        name = pid.hex()
        if name not in present:
            continue
        a = int(np.searchsorted(packs_sorted, pno, "left"))
        b = int(np.searchsorted(packs_sorted, pno, "right"))
        if a == b:
            continue
        try:
            tr = read_pack_trailer(backend, name, present[name])
        except RepositoryError:
            continue  # unreadable trailer: verify reports it; the index file stands
        rows = by_pack[a:b]
        r = t[rows]
        toff = tr["offset"].astype(np.int64)
        k = np.minimum(np.searchsorted(toff, r["offset"].astype(np.int64)), max(len(tr) - 1, 0))
        if not len(tr):
            ok[rows] = False
            bad[name] = len(rows)
            continue
        m = tr[k]
        thi, tlo = split_ids(m["id"])
        same = (
            (toff[k] == r["offset"]) & (thi == r["hi"]) & (tlo == r["lo"])
            & (m["stored_len"] == r["stored_len"]) & (m["raw_len"] == r["raw_len"])
            & (m["codec"] == r["codec"]) & (m["digest"] == r["digest"])
        )
        if not same.all():
            ok[rows[~same]] = False
            bad[name] = int((~same).sum())
    return ok, bad


def _choose(index: ChunkIndex, refs: KeyArray, present: dict[str, int],
            trusted: np.ndarray | None = None) -> tuple[
    np.ndarray, np.ndarray
]:
    """(chosen row mask, mask over ``refs`` of ids with no usable copy)."""
    t = index.table
    n = len(t)
    hi = np.ascontiguousarray(t["hi"])
    lo = np.ascontiguousarray(t["lo"])
    member = _member(refs, hi, lo)
    pack_ok = np.array([p.hex() in present for p in index.packs], dtype=bool)
    bad = ~pack_ok[t["pack"]] if n else np.zeros(0, dtype=bool)
    if trusted is not None and n:
        bad = bad | ~trusted
    if index.damaged and n:
        dam = np.zeros(n, dtype=bool)
        for row in np.flatnonzero(member).tolist():
            if (int(t["pack"][row]), int(t["offset"][row])) in index.damaged:
                dam[row] = True
        bad_or_damaged = bad | dam
    else:
        bad_or_damaged = bad
    rows = np.flatnonzero(member & ~bad)
    rh, rl, rdam = hi[rows], lo[rows], bad_or_damaged[rows]
    first = np.ones(len(rows), dtype=bool)

    def pick(*prefer: np.ndarray) -> np.ndarray:
        # per id (the table is sorted by id), the first copy by ``prefer`` keys
        order = np.lexsort((*prefer, rdam, rl, rh))
        out = np.zeros(n, dtype=bool)
        out[rows[order][first]] = True
        return out

    if len(rows):
        first[1:] = (rh[1:] != rh[:-1]) | (rl[1:] != rl[:-1])
    chosen = pick()
    if len(rows) > int(first.sum()):
        # duplicates (racing writers, a prune killed after repacking): keep the copy in
        # the pack whose bytes are most needed, so the other packs empty out instead of
        # both being repacked
        pk = t["pack"].astype(np.int64)
        used = np.bincount(pk[rows], weights=t["stored_len"][rows].astype(np.int64)
                           + ENTRY_SIZE, minlength=len(index.packs))
        size = np.array([max(present.get(p.hex(), 1), 1) for p in index.packs], dtype=float)
        share = used / size
        chosen = pick(-share[pk[rows]])
    covered = _sorted_unique(hi[chosen], lo[chosen])
    missing = ~_member(covered, refs[0], refs[1])
    return chosen, missing


def plan_prune(repo: Repository, max_unused: float, report: PruneReport,
               without: frozenset[str] = frozenset()) -> _Plan:
    """The plan (nothing changed). ``without``: restore points to plan as if removed
    (``forget --dry-run --prune``)."""
    backend = repo.backend
    scan = repo.scan()
    scan.manifests = [m for m in scan.manifests if m.backup_id not in without]
    scan.bad = [(n, w) for n, w in scan.bad if n not in without]
    if scan.bad:
        names = ", ".join(n for n, _w in scan.bad)
        raise RepositoryError(
            f"prune needs every restore point readable; damaged: {names} (inspect with "
            "snapferry verify, then remove with snapferry forget BACKUP_ID)"
        )
    index_files = {i.name: i.size for i in backend.objects("index")}
    packs = {i.name: i.size for i in backend.objects("data")}
    index = ChunkIndex()
    load = index.load(backend)
    bad_files = [n for n, _w in load.bad_files]
    for name, why in load.bad_files:
        report.problems.append(f"{why} (index/{name}): ignored, removed when replaced")
    refs = _mark(repo, index, scan.manifests)
    trusted, liars = trailer_agreement(backend, index, packs)
    for name, k in sorted(liars.items()):
        report.problems.append(f"pack {name[:16]}: {k} index entr(ies) its trailer does not "
                               "list as they say: ignored, dropped from the new index")
    chosen, missing = _choose(index, refs, packs, trusted)
    # packs no index file names: dead writers' leftovers, or packs whose index file was lost
    indexed = index.pack_names()
    unindexed = [p for p in packs if p not in indexed]
    reindexed: list[str] = []
    if missing.any() and unindexed:
        miss = (refs[0][missing], refs[1][missing])
        for name in unindexed:
            try:
                entries = read_pack_trailer(backend, name, packs[name])
            except RepositoryError:
                continue
            hi, lo = split_ids(entries["id"])
            if _member(miss, hi, lo).any():
                index.add_group(bytes.fromhex(name), entries)
                reindexed.append(name)
        if reindexed:
            len(index)  # settle the table (rows move: recompute the trailer check)
            trusted, liars = trailer_agreement(backend, index, packs)
            chosen, missing = _choose(index, refs, packs, trusted)
    if missing.any():
        k = int(missing.sum())
        first = _keys_bytes(refs[0][missing][:1], refs[1][missing][:1])[0].tobytes().hex()
        raise CorruptionError(
            f"prune stopped before deleting anything: {k} blob(s) the restore points use "
            f"have no copy (first: {first}); run snapferry verify"
        )
    plan = _Plan(scan.manifests, index_files, packs, index, chosen, len(refs[0]),
                 reindexed=reindexed, bad_index_files=bad_files, trusted=trusted)
    t = index.table
    npacks = len(index.packs)
    pk = t["pack"].astype(np.int64)
    stored = t["stored_len"].astype(np.int64)
    # one row per (pack, offset): two index files may name the same blob
    first_row = np.ones(len(t), dtype=bool)
    if len(t):
        o = np.lexsort((t["offset"], pk))
        dup = np.zeros(len(t), dtype=bool)
        dup[o[1:]] = (pk[o][1:] == pk[o][:-1]) & (t["offset"][o][1:] == t["offset"][o][:-1])
        first_row = ~dup
    used_b = np.bincount(pk[chosen], weights=stored[chosen] + ENTRY_SIZE, minlength=npacks)
    used_n = np.bincount(pk[chosen], minlength=npacks)
    all_n = np.bincount(pk[first_row], minlength=npacks)
    reindexed_set = set(reindexed)
    for pno, pid in enumerate(index.packs):
        name = pid.hex()
        size = packs.get(name)
        if size is None:
            continue  # named by an index file but gone: its entries are dropped
        overhead = PACK_HEADER_SIZE + PACK_FOOTER_SIZE
        unused = max(0, size - overhead - int(used_b[pno]))
        if used_n[pno] == 0:
            plan.delete.append(name)
            plan.unreferenced_bytes += size
        else:
            plan.unreferenced_bytes += unused
            if unused * 100.0 > max_unused * size and int(all_n[pno]) > int(used_n[pno]):
                plan.repack.append(name)
                plan.repack_unused += unused
            else:
                plan.keep.append(name)
    for name in unindexed:
        if name not in reindexed_set:
            plan.delete.append(name)
            plan.unreferenced_bytes += packs[name]
    gone = {p.hex() for p in index.packs} - set(packs)
    plan.rewrite_index = bool(
        plan.delete or plan.repack or reindexed or bad_files or gone or liars
        or not first_row.all() or len(index_files) > _index_files_needed(len(t)) * 2 + 1
    )
    report.restore_points = len(scan.manifests)
    report.packs_before = len(packs)
    report.index_files_before = len(index_files)
    report.blobs_referenced = plan.referenced
    report.bytes_before = sum(packs.values()) + sum(index_files.values())
    report.unreferenced_bytes_before = plan.unreferenced_bytes
    return plan


def _index_files_needed(entries: int) -> int:
    return max(1, -(-entries // INDEX_FILE_ENTRIES))


def _entries_of(index: ChunkIndex, rows: np.ndarray) -> np.ndarray:
    """Index-table rows -> 72-byte entries (``ENTRY_DTYPE``)."""
    t = index.table[rows]
    e = np.zeros(len(t), dtype=ENTRY_DTYPE)
    e["id"] = _keys_bytes(t["hi"], t["lo"]).reshape(-1).view("V16")
    for f in ("type", "codec", "offset", "stored_len", "raw_len"):
        e[f] = t[f]
    e["crc"] = t["crc"]
    e["digest"] = t["digest"]
    return e


# -- doing it ----------------------------------------------------------------------------------


def _repack(repo: Repository, plan: _Plan, report: PruneReport, faults: _Faults) -> list[str]:
    """Copy the chosen blobs of the repack packs into new packs; returns the packs that
    could not be emptied (a bad live blob: they are kept)."""
    backend = repo.backend
    t = plan.index.table
    pno_of = {p.hex(): i for i, p in enumerate(plan.index.packs)}
    pw = PackWriter(backend, repo.pack_size)
    failed: list[str] = []
    for name in plan.repack:
        rows = np.flatnonzero(plan.chosen & (t["pack"] == pno_of[name]))
        rows = rows[np.argsort(t["offset"][rows], kind="stable")]
        try:
            blob = backend.load("data", name)
        except ObjectMissing:
            failed.append(name)
            continue
        mv = memoryview(blob)
        copies = []
        ok = True
        for r in rows.tolist():
            row = t[r]
            off, n = int(row["offset"]), int(row["stored_len"])
            cid = _keys_bytes(t["hi"][r : r + 1], t["lo"][r : r + 1])[0].tobytes()
            stored = mv[off : off + n]
            try:
                check_blob(stored, cid=cid, codec=int(row["codec"]), raw_len=int(row["raw_len"]),
                           seed=repo.seed, crc=int(row["crc"]), digest=bytes(row["digest"]))
            except CorruptionError as e:
                report.problems.append(f"pack {name[:16]}: {e}; pack kept, not repacked")
                ok = False
                break
            copies.append((cid, int(row["type"]), int(row["codec"]), stored,
                           int(row["raw_len"]), bytes(row["digest"])))
        if not ok:
            failed.append(name)
            continue
        for cid, btype, codec, stored, raw_len, digest in copies:
            before = len(pw.written.packs)
            pw.add(cid, btype, codec, stored, raw_len, digest)
            report.blobs_copied += 1
            report.bytes_copied += len(stored)
            if len(pw.written.packs) > before:
                faults.at("repack")
    pw.flush()
    report.packs_written = len(pw.written.packs)
    report.index_files_written += len(pw.written.indexes)
    report.bytes_freed -= pw.written.pack_bytes + pw.written.index_bytes
    return failed


def _write_index(repo: Repository, plan: _Plan, keep: list[str], report: PruneReport) -> set[str]:
    """Index files naming every entry of the kept packs; returns their names."""
    index = plan.index
    t = index.table
    pno_of = {p.hex(): i for i, p in enumerate(index.packs)}
    written: set[str] = set()
    groups: list[tuple[bytes, bytes]] = []
    count = 0

    def flush() -> None:
        nonlocal groups, count
        if not groups:
            return
        name, blob = encode_index_file(groups)
        repo.backend.save("index", name, blob)  # False: the same content exists already
        written.add(name)
        if name not in plan.index_files:
            report.bytes_freed -= len(blob)
        groups, count = [], 0

    for name in sorted(keep):
        sel = t["pack"] == pno_of[name]
        if plan.trusted is not None:
            sel &= plan.trusted
        rows = np.flatnonzero(sel)
        if not len(rows):
            continue
        rows = rows[np.argsort(t["offset"][rows], kind="stable")]
        off = t["offset"][rows]
        uniq = np.ones(len(rows), dtype=bool)
        uniq[1:] = off[1:] != off[:-1]
        entries = _entries_of(index, rows[uniq])
        groups.append((bytes.fromhex(name), entries.tobytes()))
        count += len(entries)
        if count >= INDEX_FILE_ENTRIES:
            flush()
    flush()
    report.index_files_written += len(written - set(plan.index_files))
    return written


def _pid_of_temp(name: str) -> int | None:
    parts = name.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return int(parts[1])
    return None



def _remove_leftovers(backend: Backend, report: PruneReport) -> None:
    """Temp files of dead processes (never of a live one, never in ``locks/``)."""
    for info in backend.leftovers():
        if info.kind == "locks":
            continue
        pid = _pid_of_temp(info.name)
        if pid is not None and pid != os.getpid() and process_alive(pid):
            continue  # that process lives: maybe still writing
        with contextlib.suppress(RepositoryError, OSError):
            backend.remove_leftover(info)
            report.temp_files_removed += 1
            report.bytes_freed += info.size


def _remove_orphan_damaged(backend: Backend, report: PruneReport) -> None:
    import json

    present = {i.name for i in backend.objects("data")}
    for info in list(backend.objects("damaged")):
        try:
            d = json.loads(backend.load("damaged", info.name))
            packs = {str(e["pack"]) for e in d["entries"]}
        except (ValueError, KeyError, TypeError, RepositoryError):
            continue
        if not packs & present:
            backend.remove("damaged", info.name)
            report.damaged_removed += 1


def _recheck(backend: Backend, plan: _Plan) -> None:
    """Defence in depth before the first removal: no restore point appeared since the
    plan (one would mean a writer that ignored or outran the exclusive role, e.g. its
    lock was wrongly judged stale: stop, having deleted nothing). A *lock* appearing
    meanwhile is normal: a writer that starts now sees the exclusive lock and backs off
    without writing (W1), so it is not a reason to stop."""
    known = {m.backup_id for m in plan.manifests}
    for info in backend.objects("snapshots"):
        if info.name not in known:
            raise RepositoryError(
                f"prune stopped before deleting anything: restore point {info.name} was "
                "created while it ran; run prune again"
            )


@contextlib.contextmanager
def exclusive(repo: Repository, purpose: str) -> Iterator[str]:
    with locks.hold(repo.backend, "exclusive", purpose, repo.backend.location) as name:
        yield name


def prune(
    repo: Repository,
    *,
    max_unused: float = DEFAULT_MAX_UNUSED,
    dry_run: bool = False,
    lock_name: str | None = None,
    without: frozenset[str] = frozenset(),
) -> PruneReport:
    """Run prune (see the module doc). ``lock_name``: the caller already holds the
    exclusive role under that lock (``forget --prune``). ``without``: with ``dry_run``,
    plan as if those restore points were removed."""
    if not 0 <= max_unused <= 100:
        raise UsageError(f"--max-unused must be a percentage 0..100, not {max_unused}")
    t0 = time.monotonic()
    report = PruneReport(dry_run=dry_run)
    faults = _Faults()
    if dry_run:
        plan = plan_prune(repo, max_unused, report, without)
        _fill_dry(plan, report)
    elif lock_name is not None:
        _run(repo, max_unused, report, faults, lock_name)
    else:
        with exclusive(repo, "prune") as name:
            _run(repo, max_unused, report, faults, name)
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _fill_dry(plan: _Plan, report: PruneReport) -> None:
    report.packs_deleted = len(plan.delete)
    report.packs_repacked = len(plan.repack)
    report.packs_reindexed = len(plan.reindexed)
    report.bytes_freed = sum(plan.packs[p] for p in plan.delete) + plan.repack_unused
    report.bytes_after = report.bytes_before - report.bytes_freed


def _run(repo: Repository, max_unused: float, report: PruneReport, faults: _Faults,
         lock_name: str) -> None:
    backend = repo.backend
    faults.at("locked")
    plan = plan_prune(repo, max_unused, report)
    faults.at("marked")
    failed = _repack(repo, plan, report, faults) if plan.repack else []
    if plan.repack:
        faults.at("repacked")
    repacked = [p for p in plan.repack if p not in failed]
    keep = plan.keep + failed + plan.reindexed
    # reindexed packs were also classified above (their entries are in the table)
    keep = sorted(set(keep) - set(plan.delete) - set(repacked))
    new_index: set[str] = set()
    if plan.rewrite_index or repacked:
        new_index = _write_index(repo, plan, keep, report)
        if backend.properties.needs_sync:
            backend.sync()
        faults.at("indexed")
    _recheck(backend, plan)
    if plan.rewrite_index or repacked:
        for name in sorted(set(plan.index_files) - new_index):
            backend.remove("index", name)
            report.index_files_removed += 1
            report.bytes_freed += plan.index_files[name]
            faults.at("unindex")
        faults.at("unindexed")
    doomed = sorted(set(plan.delete) | set(repacked))
    for name in doomed:
        backend.remove("data", name)
        report.bytes_freed += plan.packs[name]
        faults.at("delete")
    report.packs_deleted = len(set(plan.delete))
    report.packs_repacked = len(repacked)
    report.packs_reindexed = len(plan.reindexed)
    faults.at("deleted")
    _remove_leftovers(backend, report)
    _remove_orphan_damaged(backend, report)
    faults.at("cleaned")
    report.bytes_after = sum(i.size for i in backend.objects("data")) + sum(
        i.size for i in backend.objects("index")
    )


# -- for verify ----------------------------------------------------------------------------------


def index_pack_problems(repo: Repository, index: ChunkIndex, present: dict[str, int]) -> list[str]:
    """Chunk index <-> packs: every entry an index file gives for a present pack must be
    an entry of that pack's own trailer (same id, offset, lengths, codec, digest)."""
    _ok, bad = trailer_agreement(repo.backend, index, present)
    return [f"pack {name[:16]}: {k} index entr(ies) its trailer does not list as they say "
            "(an index file disagrees with the pack)" for name, k in sorted(bad.items())]


def unreferenced_bytes(repo: Repository) -> int | None:
    """Bytes no restore point uses (inside used packs too), as prune would count them;
    None when prune could not plan (a damaged restore point or a missing blob)."""
    try:
        return plan_prune(repo, 100.0, PruneReport(dry_run=True)).unreferenced_bytes
    except RepositoryError:
        return None
