"""Check a repository: manifests, index files, packs and disk-index pages, and with
``read_data`` every referenced blob's content (CRC, zstd, keyed id, BLAKE3).

A bad chunk is reported together with every restore point that references it. With
``read_data`` the bad copies are recorded in a write-once ``damaged`` object, so the
next backup of the same data stores a fresh copy instead of reusing them (FORMAT.md,
*Damaged copies*). Leftovers of interrupted writers (packs and index files no restore
point reaches, temp files) are reported with their bytes. ``repo_info`` sums up.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from snapferry.engine.errors import CorruptionError, RepositoryError
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.store.blobs import TYPE_CHUNK
from snapferry.engine.store.chunkindex import ChunkIndex, Location
from snapferry.engine.store.chunks import ChunkReader
from snapferry.engine.store.hashing import NULL_ID
from snapferry.engine.store.manifest import Manifest
from snapferry.engine.store.pack import read_pack_trailer
from snapferry.engine.store.repo import Repository

_ID_VOID = np.dtype((np.void, 16))


@dataclass(slots=True)
class BadChunk:
    id: str
    reason: str
    affects: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "reason": self.reason, "affects": self.affects}


@dataclass(slots=True)
class Leftovers:
    """Objects no restore point reaches (reclaimable by prune) and temp files."""

    packs: int = 0
    pack_bytes: int = 0
    index_files: int = 0
    index_bytes: int = 0
    temp_files: int = 0
    temp_bytes: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "packs": self.packs, "pack_bytes": self.pack_bytes,
            "index_files": self.index_files, "index_bytes": self.index_bytes,
            "temp_files": self.temp_files, "temp_bytes": self.temp_bytes,
        }

    def notes(self) -> list[str]:
        out = []
        if self.packs:
            out.append(f"{self.packs} pack(s) of {self.pack_bytes} bytes that no restore point "
                       "uses (left by interrupted backups; reclaimable by prune)")
        if self.index_files:
            out.append(f"{self.index_files} index file(s) of {self.index_bytes} bytes that name "
                       "only unused or missing packs")
        if self.temp_files:
            out.append(f"{self.temp_files} temporary file(s) of {self.temp_bytes} bytes "
                       "(interrupted writes)")
        return out


@dataclass(slots=True)
class VerifyReport:
    repository: str
    read_data: bool
    backups_checked: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_read: int = 0
    bad_chunks: list[BadChunk] = field(default_factory=list)
    bad_backups: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    leftovers: Leftovers = field(default_factory=Leftovers)
    damaged_recorded: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "repository": self.repository,
            "read_data": self.read_data,
            "backups_checked": self.backups_checked,
            "chunks_checked": self.chunks_checked,
            "bytes_read": self.bytes_read,
            "bad_chunks": [b.to_json() for b in self.bad_chunks],
            "bad_backups": self.bad_backups,
            "problems": self.problems,
            "notes": self.notes,
            "leftovers": self.leftovers.to_json(),
            "damaged_recorded": self.damaged_recorded,
            "seconds": self.seconds,
        }


@dataclass
class _Refs:
    """What the restore points reference: id -> restore points, expected raw length."""

    by_id: dict[bytes, list[str]] = field(default_factory=dict)
    length: dict[bytes, int] = field(default_factory=dict)

    def add(self, cid: bytes, bid: str, n: int) -> None:
        lst = self.by_id.setdefault(cid, [])
        if not lst or lst[-1] != bid:
            lst.append(bid)
        self.length.setdefault(cid, n)


def _collect(
    repo: Repository, reader: ChunkReader, m: Manifest, refs: _Refs, report: VerifyReport,
    bad_points: set[str],
) -> None:
    bid = m.backup_id
    for entry in m.disks:
        try:
            idx = repo.load_index(bid, entry.name, m, reader=reader)
        except RepositoryError as e:
            report.problems.append(f"restore point {bid}, disk {entry.name}: {e}")
            bad_points.add(bid)
            continue
        last = len(idx) - 1
        for p in range(idx.page_count):
            pid = idx.page_ids[p]
            if pid is None:
                continue
            refs.add(pid, bid, idx.page_len(p) * 16)
            try:
                arr = idx.page(p)
            except RepositoryError as e:
                report.problems.append(
                    f"restore point {bid}, disk {entry.name}: index page {p}: {e}"
                )
                bad_points.add(bid)
                continue
            assert arr is not None
            base = p * idx.page_entries
            u, first = np.unique(np.ascontiguousarray(arr).view(_ID_VOID).ravel(),
                                 return_index=True)
            for cid_v, k in zip(u.tolist(), first.tolist(), strict=True):
                cid = bytes(cid_v)
                if cid == NULL_ID:
                    continue
                refs.add(cid, bid, idx.length(base + k) if base + k == last else idx.chunk_size)


def verify_repo(
    repo: Repository,
    backup_id: str | None = None,
    *,
    read_data: bool = False,
    progress: Progress = NullProgress(),
    workers: int = 0,
) -> VerifyReport:
    """Check one restore point (or all) and the blobs they reference, holding the
    shared role (a prune waits; FORMAT.md D8)."""
    t0 = time.monotonic()
    report = VerifyReport(repository=repo.backend.location, read_data=read_data)

    def warn(msg: str) -> None:
        report.notes.append(msg)
        progress.note(f"warning: {msg}")

    with repo.reading("verify", warn):
        _verify(repo, backup_id, report, read_data=read_data, progress=progress,
                workers=workers)
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _verify(
    repo: Repository,
    backup_id: str | None,
    report: VerifyReport,
    *,
    read_data: bool,
    progress: Progress,
    workers: int,
) -> None:
    backend = repo.backend
    bad_points: set[str] = set()
    if backup_id is not None:
        manifests = [repo.load_manifest(backup_id)]  # unknown id: RepositoryError
    else:
        scan = repo.scan()
        manifests = scan.manifests
        for name, why in scan.bad:
            report.problems.append(f"restore point {name}: {why}")
            report.backups_checked.append(name)
            bad_points.add(name)

    index = ChunkIndex()
    load = index.load(backend)
    for name, why in load.bad_files:
        report.problems.append(f"{why} (index/{name})")
    packs_present = {i.name: i.size for i in backend.objects("data")}
    bad_packs: dict[str, str] = {}
    for name in sorted(index.pack_names()):
        if name not in packs_present:
            bad_packs[name] = f"pack {name[:16]} is missing"
            continue
        try:
            read_pack_trailer(backend, name, packs_present[name])
        except RepositoryError as e:
            bad_packs[name] = str(e)
    reader = ChunkReader(backend, repo.seed, index)

    refs = _Refs()
    for m in manifests:
        report.backups_checked.append(m.backup_id)
        if m.parent is not None and not repo.has_backup(m.parent):
            report.notes.append(f"restore point {m.backup_id}: parent {m.parent} no longer exists")
        _collect(repo, reader, m, refs, report, bad_points)

    ids = sorted(refs.by_id)
    total = sum(refs.length[c] for c in ids) if read_data else len(ids)
    progress.start("verify data" if read_data else "verify chunks", total)
    bad: dict[bytes, str] = {}
    damaged_new: list[tuple[str, int, bytes]] = []
    superseded = 0

    def structure(cid: bytes) -> str | None:
        cands = index.candidates(cid)
        if not cands:
            return "missing from the repository index"
        why = []
        for loc in cands:
            if loc.pack in bad_packs:
                why.append(bad_packs[loc.pack])
            elif loc.raw_len != refs.length[cid]:
                why.append(f"holds {loc.raw_len} bytes, restore points need {refs.length[cid]}")
            elif loc.damaged:
                why.append("recorded as damaged by an earlier verify")
            else:
                return None
        return "; ".join(why)

    if not read_data:
        for cid in ids:
            fault = structure(cid)
            if fault is not None:
                bad[cid] = fault
            progress.advance(1)
    else:
        def check(cid: bytes) -> tuple[bytes, str | None, int, list[Location], int]:
            cands = index.candidates(cid)
            if not cands:
                return cid, "missing from the repository index", 0, [], 0
            good = 0
            bad_copies: list[Location] = []
            errors: list[str] = []
            nread = 0
            for loc in cands:
                try:
                    data = reader.read_at(loc, cid, full=True)
                    nread += loc.stored_len
                    if len(memoryview(data)) != refs.length[cid]:
                        raise CorruptionError(
                            f"holds {loc.raw_len} bytes, restore points need {refs.length[cid]}"
                        )
                    if not loc.damaged:
                        good += 1
                except RepositoryError as e:
                    errors.append(_reason(e, cid))
                    bad_copies.append(loc)
            if good:
                return cid, None, nread, bad_copies, len(bad_copies)
            return cid, "; ".join(errors) or "every copy is recorded as damaged", nread, (
                bad_copies
            ), 0

        n = workers if workers > 0 else min(os.cpu_count() or 1, 8)
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="verify") as pool:
            pending: deque[Future[tuple[bytes, str | None, int, list[Location], int]]] = deque()

            def drain(limit: int) -> None:
                nonlocal superseded
                while len(pending) > limit:
                    cid, why, nread, copies, sup = pending.popleft().result()
                    report.bytes_read += nread
                    superseded += sup
                    for loc in copies:
                        if not loc.damaged:
                            damaged_new.append((loc.pack, loc.offset, cid))
                    if why is not None:
                        bad[cid] = why
                    progress.advance(refs.length[cid])

            for cid in ids:
                pending.append(pool.submit(check, cid))
                drain(4 * n)
            drain(0)
    progress.finish()
    report.chunks_checked = len(ids)

    for cid, why in sorted(bad.items(), key=lambda kv: kv[0]):
        affects = sorted(set(refs.by_id[cid]))
        bad_points.update(affects)
        report.bad_chunks.append(BadChunk(cid.hex(), why, affects))
        report.problems.append(f"chunk {cid.hex()}: {why}; affects {', '.join(affects)}")
    report.bad_backups = sorted(bad_points)
    if damaged_new:
        report.damaged_recorded = _record_damaged(repo, damaged_new)
        report.notes.append(
            f"{len(damaged_new)} damaged blob cop(ies) recorded: the next backup of that data "
            "stores a fresh copy"
        )
    if superseded:
        report.notes.append(f"{superseded} damaged cop(ies) superseded by a good copy "
                            "(reclaimable by prune)")
    if backup_id is None:
        report.leftovers = leftovers(repo, index, refs.by_id.keys(), packs_present)
        report.notes.extend(report.leftovers.notes())
        _index_and_space(repo, index, packs_present, report)  # prune's view (issue 10)


def _index_and_space(
    repo: Repository, index: ChunkIndex, packs_present: dict[str, int], report: VerifyReport
) -> None:
    from snapferry.engine.store.prune import index_pack_problems, unreferenced_bytes

    report.problems.extend(index_pack_problems(repo, index, packs_present))
    unused = unreferenced_bytes(repo)
    if unused:
        report.notes.append(f"{unused} bytes are held by data no restore point uses "
                            "(snapferry prune frees them)")


def _record_damaged(repo: Repository, copies: list[tuple[str, int, bytes]]) -> int:
    body = {
        "format": 2,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "entries": [{"pack": p, "offset": o, "id": c.hex()} for p, o, c in sorted(copies)],
    }
    raw = (json.dumps(body, indent=1) + "\n").encode()
    repo.backend.save("damaged", repo.sealer.digest(raw).hex(), raw)
    return len(copies)


def leftovers(
    repo: Repository, index: ChunkIndex, referenced: Any, packs_present: dict[str, int]
) -> Leftovers:
    """Packs no restore point uses, index files naming only such packs, temp files."""
    out = Leftovers()
    used_packs: set[str] = set()
    ref_ids = np.frombuffer(b"".join(referenced), dtype=np.uint8).reshape(-1, 16)
    if len(ref_ids):
        t = index.table
        hi, lo = _split(ref_ids)
        keys = np.empty(len(t), dtype=[("hi", "<u8"), ("lo", "<u8")])
        keys["hi"], keys["lo"] = t["hi"], t["lo"]
        want = np.empty(len(hi), dtype=keys.dtype)
        want["hi"], want["lo"] = hi, lo
        mask = np.isin(keys, want)
        used_packs = {index.packs[int(p)].hex() for p in np.unique(t["pack"][mask]).tolist()}
    for name, size in packs_present.items():
        if name not in used_packs:
            out.packs += 1
            out.pack_bytes += size
    for info in repo.backend.objects("index"):
        try:
            from snapferry.engine.store.pack import decode_index_file

            groups = decode_index_file(info.name, repo.backend.load("index", info.name),
                                       repo.sealer.digest)
        except RepositoryError:
            continue  # reported as a problem already
        if not any(pid.hex() in used_packs for pid, _e in groups):
            out.index_files += 1
            out.index_bytes += info.size
    for left in repo.leftovers():
        out.temp_files += 1
        out.temp_bytes += left.size
    return out


def _split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from snapferry.engine.store.chunkindex import split_ids

    return split_ids(ids)


def _reason(e: Exception, cid: bytes) -> str:
    msg = str(e)
    for prefix in (f"chunk {cid.hex()}", f"blob {cid.hex()}"):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :].lstrip(": ").strip()
    return msg or type(e).__name__


def repo_info(repo: Repository) -> dict[str, Any]:
    """Sizes, chunk count, logical size of all restore points, dedup ratio, leftovers."""
    backend = repo.backend
    size_on_disk = 0
    for kind in ("config", "data", "index", "snapshots", "locks", "damaged", "keys"):
        for info in backend.objects(kind):
            size_on_disk += info.size
    index = repo.chunk_index()
    t = index.table
    chunks = t[t["type"] == TYPE_CHUNK]
    stored = int(chunks["stored_len"].astype(np.int64).sum())
    raw = int(chunks["raw_len"].astype(np.int64).sum())
    chunk_count = len(np.unique(chunks[["hi", "lo"]])) if len(chunks) else 0
    scan = repo.scan()
    points: list[dict[str, Any]] = []
    logical = 0
    referenced = 0
    reader = ChunkReader(backend, repo.seed, index)
    refs = _Refs()
    dummy = VerifyReport(repository=backend.location, read_data=False)
    for m in scan.manifests:
        logical += m.logical_bytes
        nonzero = 0
        for d in m.disks:
            nonzero += min(d.virtual_size, (d.chunks - d.zero_chunks) * m.chunk_size)
        referenced += nonzero
        _collect(repo, reader, m, refs, dummy, set())
        points.append(
            {
                "backup_id": m.backup_id,
                "vm": m.vm,
                "created": m.created,
                "mode": m.mode,
                "parent": m.parent,
                "consistency": m.consistency,
                "disks": m.disk_names,
                "logical_bytes": m.logical_bytes,
                "data_bytes": nonzero,
            }
        )
    packs_present = {i.name: i.size for i in backend.objects("data")}
    left = leftovers(repo, index, refs.by_id.keys(), packs_present)
    return {
        "path": backend.location,
        "id": repo.id,
        "format": repo.config.get("format"),
        "chunk_size": repo.chunk_size,
        "zstd_level": repo.zstd_level,
        "pack_size": repo.pack_size,
        "encryption": repo.config.get("encryption", "none"),
        "size_on_disk": size_on_disk,
        "packs": len(packs_present),
        "index_files": len(index.files),
        "index_memory_bytes": index.nbytes(),
        "chunks": chunk_count,
        "chunk_bytes_raw": raw,
        "chunk_bytes_stored": stored,
        "logical_bytes": logical,
        "data_bytes": referenced,
        "dedup_ratio": round(referenced / raw, 3) if raw else None,
        "compression_ratio": round(raw / stored, 3) if stored else None,
        "total_ratio": round(referenced / size_on_disk, 3) if size_on_disk else None,
        "restore_points": points,
        "damaged_restore_points": [{"backup_id": n, "problem": why} for n, why in scan.bad],
        "leftovers": left.to_json(),
    }
