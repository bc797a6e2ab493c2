"""Check a repository: structure (manifests, indexes, chunk headers) and, with
``read_data``, every referenced chunk's content (decode, BLAKE3, keyed id).

A bad chunk is reported together with every restore point that references it, so the
user knows which restore points are damaged. ``repo_info`` sums up a repository.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapferry.engine.errors import CorruptionError, RepositoryError
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.store.chunkfmt import decode_verified
from snapferry.engine.store.index import DiskIndex
from snapferry.engine.store.manifest import Manifest
from snapferry.engine.store.repo import BACKUPS, MANIFEST, Repository


@dataclass(slots=True)
class BadChunk:
    id: str
    reason: str
    affects: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "reason": self.reason, "affects": self.affects}


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
            "seconds": self.seconds,
        }


def _manifests(
    repo: Repository, backup_id: str | None, report: VerifyReport
) -> list[tuple[str, Manifest | None]]:
    """(backup id, manifest or None when unreadable) for the restore points to check."""
    if backup_id is not None:
        return [(backup_id, repo.load_manifest(backup_id))]  # unknown id: RepositoryError
    out: list[tuple[str, Manifest | None]] = []
    for mp in sorted((repo.path / BACKUPS).glob(f"*/*/{MANIFEST}")):
        bid = mp.parent.name
        try:
            out.append((bid, repo.load_manifest(bid)))
        except RepositoryError as e:
            report.problems.append(f"restore point {bid}: {e}")
            out.append((bid, None))
    return out


def verify_repo(
    repo: Repository,
    backup_id: str | None = None,
    *,
    read_data: bool = False,
    progress: Progress = NullProgress(),
    workers: int = 0,
) -> VerifyReport:
    """Check one restore point (or all) and the chunks they reference."""
    t0 = time.monotonic()
    report = VerifyReport(repository=str(repo.path), read_data=read_data)
    refs: dict[bytes, list[str]] = {}
    expected_len: dict[bytes, int] = {}
    bad_points: set[str] = set()

    for bid, m in _manifests(repo, backup_id, report):
        report.backups_checked.append(bid)
        if m is None:
            bad_points.add(bid)
            continue
        if m.chunk_size != repo.chunk_size:
            report.problems.append(
                f"restore point {bid}: chunk size {m.chunk_size} != repository's {repo.chunk_size}"
            )
            bad_points.add(bid)
            continue
        if m.parent is not None:
            try:
                repo.backup_dir(m.parent)
            except RepositoryError:
                report.notes.append(f"restore point {bid}: parent {m.parent} no longer exists")
        for entry in m.disks:
            try:
                idx = repo.load_index(bid, entry.name, m)
            except RepositoryError as e:
                report.problems.append(f"restore point {bid}, disk {entry.name}: {e}")
                bad_points.add(bid)
                continue
            if entry.chunks and entry.chunks != len(idx):
                report.problems.append(
                    f"restore point {bid}, disk {entry.name}: manifest says {entry.chunks} "
                    f"chunks, index holds {len(idx)}"
                )
                bad_points.add(bid)
            _collect(idx, bid, refs, expected_len)

    ids = list(refs)
    total = sum(expected_len[c] for c in ids) if read_data else len(ids)
    progress.start("verify data" if read_data else "verify chunks", total)
    bad: dict[bytes, str] = {}
    store = repo.store
    if not read_data:
        for cid in ids:
            try:
                hdr = store.header(cid)
                if hdr.raw_len != expected_len[cid]:
                    raise CorruptionError(
                        f"chunk holds {hdr.raw_len} bytes, restore points need {expected_len[cid]}"
                    )
            except RepositoryError as e:
                bad[cid] = _reason(e, cid)
            progress.advance(1)
    else:
        seed = repo.seed

        def check(cid: bytes) -> tuple[bytes, str | None, int]:
            try:
                blob = store.get(cid)
                data = decode_verified(blob, cid, seed)
                if len(data) != expected_len[cid]:
                    raise CorruptionError(
                        f"chunk holds {len(data)} bytes, restore points need {expected_len[cid]}"
                    )
            except RepositoryError as e:
                return cid, _reason(e, cid), 0
            return cid, None, len(blob)

        n = workers if workers > 0 else min(os.cpu_count() or 1, 8)
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="verify") as pool:
            pending: deque[Future[tuple[bytes, str | None, int]]] = deque()

            def drain(limit: int) -> None:
                while len(pending) > limit:
                    cid, why, nread = pending.popleft().result()
                    report.bytes_read += nread
                    if why is not None:
                        bad[cid] = why
                    progress.advance(expected_len[cid])

            for cid in ids:
                pending.append(pool.submit(check, cid))
                drain(4 * n)
            drain(0)
    progress.finish()
    report.chunks_checked = len(ids)

    for cid, why in sorted(bad.items(), key=lambda kv: kv[0]):
        affects = sorted(set(refs[cid]))
        bad_points.update(affects)
        report.bad_chunks.append(BadChunk(cid.hex(), why, affects))
        report.problems.append(f"chunk {cid.hex()}: {why}; affects {', '.join(affects)}")
    report.bad_backups = sorted(bad_points)
    tmp = store.temp_files()
    if tmp:
        report.notes.append(f"{len(tmp)} leftover temporary chunk files (interrupted writes)")
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _reason(e: Exception, cid: bytes) -> str:
    msg = str(e)
    prefix = f"chunk {cid.hex()}"
    if msg.startswith(prefix):
        msg = msg[len(prefix) :].lstrip(": ").strip()
    return msg or type(e).__name__


def _collect(
    idx: DiskIndex, bid: str, refs: dict[bytes, list[str]], expected_len: dict[bytes, int]
) -> None:
    last = len(idx) - 1
    last_id = idx.get(last) if last >= 0 else None
    for cid in idx.unique_ids():
        lst = refs.setdefault(cid, [])
        if not lst or lst[-1] != bid:
            lst.append(bid)
        n = idx.chunk_size
        if cid == last_id and idx.length(last) != idx.chunk_size:
            # a chunk at the (partial) end of the disk: its own length (used only there,
            # unless the same bytes also fill a whole chunk, which cannot be: the lengths
            # differ and so do the ids)
            n = idx.length(last)
        expected_len.setdefault(cid, n)


def repo_info(repo: Repository) -> dict[str, Any]:
    """Size on disk, chunk count, logical size of all restore points, dedup ratio."""
    size_on_disk = 0
    for dirpath, _dirs, files in os.walk(repo.path):
        for f in files:
            try:
                size_on_disk += os.lstat(Path(dirpath) / f).st_blocks * 512
            except FileNotFoundError:
                pass
    chunk_count = 0
    stored = 0
    raw = 0
    for cid in repo.store.iterate():
        try:
            hdr = repo.store.header(cid)
        except RepositoryError:
            continue
        chunk_count += 1
        stored += hdr.stored_len
        raw += hdr.raw_len
    points: list[dict[str, Any]] = []
    logical = 0
    referenced = 0
    for m in repo.list_backups():
        logical += m.logical_bytes
        nonzero = 0
        for d in m.disks:
            # manifest counts; the chunk bytes of the last partial chunk are approximated
            nonzero += min(d.virtual_size, (d.chunks - d.zero_chunks) * m.chunk_size)
        referenced += nonzero
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
    return {
        "path": str(repo.path),
        "id": repo.id,
        "format": repo.config.get("format"),
        "chunk_size": repo.chunk_size,
        "zstd_level": repo.zstd_level,
        "size_on_disk": size_on_disk,
        "chunks": chunk_count,
        "chunk_bytes_raw": raw,
        "chunk_bytes_stored": stored,
        "logical_bytes": logical,
        "data_bytes": referenced,
        "dedup_ratio": round(referenced / raw, 3) if raw else None,
        "compression_ratio": round(raw / stored, 3) if stored else None,
        "total_ratio": round(referenced / size_on_disk, 3) if size_on_disk else None,
        "restore_points": points,
    }
