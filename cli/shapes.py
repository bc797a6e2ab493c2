"""The JSON shapes that several commands share (docs/JSON.md): a restore point and a
disk look the same in ``list``, ``info`` and ``backup``. Pure re-arrangement of what
the engine returns; no decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the store loads when a command runs
    from snapferry.engine.store.manifest import DiskEntry, Manifest

DISK_KEYS = (
    "name", "virtual_size", "chunks", "zero_chunks", "chunks_new", "chunks_reused",
    "bytes_read", "bytes_stored", "full_reason", "source", "tracking",
)


def disk_doc(d: DiskEntry) -> dict[str, Any]:
    """One disk of a restore point."""
    return {
        "name": d.name,
        "virtual_size": d.virtual_size,
        "chunks": d.chunks,
        "zero_chunks": d.zero_chunks,
        "chunks_new": d.chunks_new,
        "chunks_reused": d.chunks_reused,
        "bytes_read": d.bytes_read,
        "bytes_stored": d.bytes_stored,
        "full_reason": d.full_reason,
        "cbt_audit": d.cbt_audit,
        "source": d.source,
        "tracking": d.tracking,
    }


def _source(m: Manifest) -> dict[str, Any] | None:
    """What was backed up: the VM (from the manifest's extra facts) or the first disk's
    source (a file, image or NBD export)."""
    extra = m.extra or {}
    for key in ("source", "vm_source", "target"):
        v = extra.get(key)
        if isinstance(v, dict) and v:
            return v
        if isinstance(v, str) and v:
            return {"uri": v}
    for d in m.disks:
        if d.source:
            return d.source
    return None


def restore_point_doc(m: Manifest) -> dict[str, Any]:
    """One restore point: everything a script needs without opening the manifest."""
    extra = m.extra or {}
    phases = extra.get("phase_seconds") if isinstance(extra.get("phase_seconds"), dict) else None
    return {
        "backup_id": m.backup_id,
        "vm": m.vm,
        # the series' source identity (HOST:/abs/path, NBD URI, VM id); null in
        # restore points made before it was recorded
        "identity": m.identity,
        "created": m.created,
        "mode": m.mode,
        "parent": m.parent,
        "consistency": m.consistency,
        "quiesced": m.quiesced,
        "freeze_ms": m.freeze_ms,
        "verified": m.verified,
        "source": _source(m),
        "chunk_size": m.chunk_size,
        "logical_bytes": m.logical_bytes,
        "bytes_read": sum(d.bytes_read for d in m.disks),
        "bytes_stored": sum(d.bytes_stored for d in m.disks),
        "chunks": sum(d.chunks for d in m.disks),
        "zero_chunks": sum(d.zero_chunks for d in m.disks),
        "chunks_new": sum(d.chunks_new for d in m.disks),
        "chunks_reused": sum(d.chunks_reused for d in m.disks),
        "seconds": phases.get("total") if phases else extra.get("seconds"),
        "warnings": list(extra.get("warnings") or []),
        "disks": [disk_doc(d) for d in m.disks],
    }


def source_text(m: Manifest) -> str:
    """What a restore point was made from, for a table: its recorded identity, else the
    VM's disk image (a VM's disks are read through a temporary NBD export whose URI
    means nothing later), else the path or URI of its first disk's source."""
    identity = m.identity
    if identity:
        return identity
    files = [str(d.tracking["file"]) for d in m.disks if d.tracking.get("file")]
    if files:
        return ", ".join(files)
    src = _source(m) or {}
    for key in ("path", "uri"):
        if isinstance(src.get(key), str) and src[key]:
            return str(src[key])
    return "-"


def short_time(created: str) -> str:
    """``2026-12-01T20:00:44.123456Z`` → ``2026-12-01 20:00:44`` (UTC, for tables)."""
    return created.replace("T", " ").split(".")[0].rstrip("Z")
