"""Changed Block Tracking: changeIds and paged ``QueryChangedDiskAreas`` answers.

A changeId reads ``<uuid>/<sequence>``; the uuid changes whenever vSphere resets CBT
for the disk (CBT toggled, disk moved/restored, ...), and then no incremental can be
chained to the old changeId. ``QueryChangedDiskAreas`` answers one page at a time
(a ``DiskChangeInfo``: ``startOffset``, ``length`` and the ``changedArea`` list inside
it); the caller asks again from ``startOffset + length`` until the disk's capacity.

The answers are checked before they are trusted: areas sorted, non-overlapping, inside
the disk and inside the page; every page moves forward. Anything else raises
``ChangedAreasInvalid`` and the caller falls back to a full backup, saying why: an
incremental built on a wrong change list would silently miss writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# A page answer: anything with startOffset, length and changedArea[(start, length)].
PageQuery = Callable[[int], Any]

MAX_PAGES = 1_000_000


class ChangedAreasInvalid(Exception):
    """The changed-area answers cannot be trusted; the message says why."""


def change_id_uuid(change_id: str | None) -> str | None:
    """The uuid part of ``<uuid>/<seq>`` (None when absent or malformed)."""
    if not change_id or "/" not in change_id:
        return None
    uuid, _, seq = change_id.rpartition("/")
    return uuid or None if seq else None


def cbt_reset_reason(parent_change_id: str | None, current_change_id: str | None) -> str | None:
    """Why an incremental cannot chain from ``parent_change_id`` (None: it can)."""
    if not parent_change_id:
        return "the parent restore point recorded no CBT changeId for this disk"
    if not current_change_id:
        return "the snapshot's disk carries no CBT changeId (change tracking inactive)"
    parent_uuid = change_id_uuid(parent_change_id)
    if parent_uuid is None:
        return f"the parent's changeId {parent_change_id!r} is malformed"
    current_uuid = change_id_uuid(current_change_id)
    if current_uuid is None:
        return f"the snapshot's changeId {current_change_id!r} is malformed"
    if parent_uuid != current_uuid:
        return (
            f"CBT was reset on this disk (changeId {parent_change_id} -> {current_change_id})"
        )
    return None


def _int(obj: Any, name: str) -> int:
    value = getattr(obj, name, None)
    if value is None:
        raise ChangedAreasInvalid(f"QueryChangedDiskAreas answer lacks {name}")
    return int(value)


def collect_changed_areas(
    query: PageQuery, capacity: int, *, max_pages: int = MAX_PAGES
) -> list[tuple[int, int]]:
    """Page through ``query(start_offset)`` until ``capacity``; validated, coalesced areas."""
    if capacity <= 0:
        return []
    areas: list[tuple[int, int]] = []
    start = 0
    pages = 0
    while start < capacity:
        pages += 1
        if pages > max_pages:
            raise ChangedAreasInvalid(f"more than {max_pages} pages of changed areas")
        info = query(start)
        if info is None:
            raise ChangedAreasInvalid(f"no answer for the changed areas from offset {start}")
        page_start = _int(info, "startOffset")
        page_len = _int(info, "length")
        page_end = page_start + page_len
        if page_start > start or page_start < 0:
            raise ChangedAreasInvalid(
                f"page asked from offset {start} starts at {page_start}: a range would be skipped"
            )
        if page_len < 0 or page_end <= start:
            raise ChangedAreasInvalid(
                f"page at offset {start} does not advance (startOffset {page_start}, "
                f"length {page_len})"
            )
        for area in getattr(info, "changedArea", None) or []:
            a_start = _int(area, "start")
            a_len = _int(area, "length")
            if a_len < 0 or a_start < 0:
                raise ChangedAreasInvalid(f"negative changed area ({a_start}, {a_len})")
            if a_len == 0:
                continue
            a_end = a_start + a_len
            if a_end > capacity:
                raise ChangedAreasInvalid(
                    f"changed area {a_start}+{a_len} runs past the disk's capacity {capacity}"
                )
            if a_start < page_start or a_end > page_end:
                raise ChangedAreasInvalid(
                    f"changed area {a_start}+{a_len} lies outside its page "
                    f"{page_start}+{page_len}"
                )
            if areas:
                prev_start, prev_len = areas[-1]
                prev_end = prev_start + prev_len
                if a_start < prev_end:
                    what = "overlaps" if a_start >= prev_start else "comes before"
                    raise ChangedAreasInvalid(
                        f"changed area {a_start}+{a_len} {what} the area "
                        f"{prev_start}+{prev_len} (answers not sorted/disjoint)"
                    )
                if a_start == prev_end:  # adjacent: coalesce
                    areas[-1] = (prev_start, prev_len + a_len)
                    continue
            areas.append((a_start, a_len))
        start = page_end
    return areas
