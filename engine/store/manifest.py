"""``Manifest``: the JSON description of one restore point (``snapshots/<backup id>``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

from snapferry.engine.errors import CorruptionError, RepositoryError

MANIFEST_FORMAT = 2
PageRef = str | int
"""A page id (32 hex digits) or a count of consecutive null pages."""

Mode = Literal["full", "incremental"]
Consistency = Literal["filesystem", "application", "crash", "n/a"]
Verified = Literal["full", "quick"]
MODES = ("full", "incremental")
CONSISTENCIES = ("filesystem", "application", "crash", "n/a")
VERIFIED = ("full", "quick")


def utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(slots=True)
class DiskEntry:
    """One disk of a restore point and the facts of how it was copied."""

    name: str
    virtual_size: int
    chunks: int = 0
    zero_chunks: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    chunks_new: int = 0
    chunks_reused: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)
    full_reason: str | None = None
    page_entries: int = 4096
    pages: list[PageRef] = field(default_factory=list)


@dataclass(slots=True)
class Manifest:
    backup_id: str
    vm: str
    chunk_size: int
    mode: Mode = "full"
    parent: str | None = None
    created: str = field(default_factory=utc_now_iso)
    consistency: Consistency = "crash"
    quiesced: bool | None = None
    freeze_ms: float | None = None
    disks: list[DiskEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    verified: Verified = "quick"
    format: int = MANIFEST_FORMAT

    def disk(self, name: str) -> DiskEntry:
        for d in self.disks:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def disk_names(self) -> list[str]:
        return [d.name for d in self.disks]

    @property
    def logical_bytes(self) -> int:
        return sum(d.virtual_size for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # stable, readable key order: format first
        return {"format": d.pop("format"), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Any, *, name: str = "manifest") -> Manifest:
        if not isinstance(d, dict):
            raise CorruptionError(f"{name}: not a JSON object")
        fmt = d.get("format")
        if not isinstance(fmt, int):
            raise CorruptionError(f"{name}: no format number")
        if fmt < MANIFEST_FORMAT:
            raise RepositoryError(f"{name}: manifest format {fmt} is not read by this snapferry")
        if fmt > MANIFEST_FORMAT:
            raise RepositoryError(
                f"{name}: manifest format {fmt} is newer than this snapferry supports "
                f"({MANIFEST_FORMAT}); upgrade snapferry"
            )
        try:
            disks_raw = d["disks"]
            if not isinstance(disks_raw, list):
                raise TypeError("disks is not a list")
            disks = [_build(DiskEntry, x) for x in disks_raw]
            known = {f.name for f in fields(cls)} - {"disks"}
            m = cls(disks=disks, **{k: v for k, v in d.items() if k in known})
            _check(m)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptionError(f"{name}: invalid manifest ({e})") from None
        return m

    @classmethod
    def from_json(cls, text: str | bytes, *, name: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptionError(f"{name}: not valid JSON ({e})") from None
        return cls.from_dict(d, name=name)


def _build(cls: type[DiskEntry], x: Any) -> DiskEntry:
    if not isinstance(x, dict):
        raise TypeError("disk entry is not an object")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in x.items() if k in known})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(m: Manifest) -> None:
    if not isinstance(m.backup_id, str) or not m.backup_id:
        raise ValueError("backup_id")
    if not isinstance(m.vm, str) or not m.vm:
        raise ValueError("vm")
    if not _is_int(m.chunk_size) or m.chunk_size <= 0:
        raise ValueError("chunk_size")
    if m.mode not in MODES:
        raise ValueError(f"mode {m.mode!r}")
    if m.consistency not in CONSISTENCIES:
        raise ValueError(f"consistency {m.consistency!r}")
    if m.verified not in VERIFIED:
        raise ValueError(f"verified {m.verified!r}")
    if m.parent is not None and not isinstance(m.parent, str):
        raise ValueError("parent")
    if not isinstance(m.extra, dict):
        raise ValueError("extra")
    seen: set[str] = set()
    for dk in m.disks:
        if not isinstance(dk.name, str) or not dk.name or dk.name in seen:
            raise ValueError(f"disk name {dk.name!r}")
        seen.add(dk.name)
        if not _is_int(dk.virtual_size) or dk.virtual_size < 0:
            raise ValueError(f"disk {dk.name}: virtual_size")
        for f in ("chunks", "zero_chunks", "bytes_read", "bytes_stored", "chunks_new",
                  "chunks_reused"):
            if not _is_int(getattr(dk, f)) or getattr(dk, f) < 0:
                raise ValueError(f"disk {dk.name}: {f}")
        if not isinstance(dk.source, dict) or not isinstance(dk.tracking, dict):
            raise ValueError(f"disk {dk.name}: source/tracking")
        if dk.full_reason is not None and not isinstance(dk.full_reason, str):
            raise ValueError(f"disk {dk.name}: full_reason")
        pe = dk.page_entries
        if not _is_int(pe) or pe < 256 or pe > 65536 or pe & (pe - 1):
            raise ValueError(f"disk {dk.name}: page_entries")
        n = -(-dk.virtual_size // m.chunk_size)
        if dk.chunks != n or dk.zero_chunks > n:
            raise ValueError(f"disk {dk.name}: chunks {dk.chunks} for {dk.virtual_size} bytes")
        if not isinstance(dk.pages, list):
            raise ValueError(f"disk {dk.name}: pages")
        total = 0
        for ref in dk.pages:
            if _is_int(ref) and ref > 0:  # type: ignore[operator]
                total += ref  # type: ignore[operator]
            elif isinstance(ref, str) and len(ref) == 32 and _is_hex(ref):
                total += 1
            else:
                raise ValueError(f"disk {dk.name}: page reference {ref!r}")
        if total != -(-n // pe):
            raise ValueError(f"disk {dk.name}: pages cover {total} pages, not {-(-n // pe)}")
    for f in ("created",):
        if not isinstance(getattr(m, f), str):
            raise ValueError(f)
    if m.quiesced is not None and not isinstance(m.quiesced, bool):
        raise ValueError("quiesced")
    if m.freeze_ms is not None and (
        isinstance(m.freeze_ms, bool) or not isinstance(m.freeze_ms, int | float)
    ):
        raise ValueError("freeze_ms")


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
    except ValueError:
        return False
    return True


def encode_pages(ids: list[bytes | None]) -> list[PageRef]:
    """Page ids -> the manifest's list (runs of null pages as counts)."""
    out: list[PageRef] = []
    for pid in ids:
        if pid is None:
            if out and isinstance(out[-1], int):
                out[-1] += 1
            else:
                out.append(1)
        else:
            out.append(pid.hex())
    return out


def decode_pages(refs: list[PageRef]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for ref in refs:
        if isinstance(ref, int):
            out.extend([None] * ref)
        else:
            out.append(bytes.fromhex(ref))
    return out
