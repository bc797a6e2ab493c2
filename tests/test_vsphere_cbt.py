"""Paging and validation of QueryChangedDiskAreas answers (snapferry.engine.vsphere.cbt).

vCSim does not implement QueryChangedDiskAreas (it answers MethodNotFound), so the
answers here are recorded ones, built from pyVmomi's own data objects
(``vim.VirtualMachine.DiskChangeInfo``) and served by a stand-in for the one pyvmomi
call: the query callable. The backend's use of it is tested in test_vsphere_faults.py.
"""

from __future__ import annotations

import pytest
from pyVmomi import vim

from snapferry.engine.vsphere.cbt import (
    ChangedAreasInvalid,
    cbt_reset_reason,
    change_id_uuid,
    collect_changed_areas,
)

MiB = 1 << 20
Area = vim.VirtualMachine.DiskChangeInfo.DiskChangeExtent


def page(start: int, length: int, *areas: tuple[int, int]) -> vim.VirtualMachine.DiskChangeInfo:
    return vim.VirtualMachine.DiskChangeInfo(
        startOffset=start, length=length, changedArea=[Area(start=s, length=n) for s, n in areas]
    )


class RecordedQuery:
    """Serves recorded pages keyed by the startOffset asked for; records the asks."""

    def __init__(self, pages: dict[int, vim.VirtualMachine.DiskChangeInfo]) -> None:
        self.pages = pages
        self.asked: list[int] = []

    def __call__(self, start: int) -> vim.VirtualMachine.DiskChangeInfo:
        self.asked.append(start)
        return self.pages[start]


def test_several_pages_are_followed_and_adjacent_areas_merged() -> None:
    q = RecordedQuery(
        {
            0: page(0, 4 * MiB, (0, 64 << 10), (1 * MiB, 64 << 10)),
            4 * MiB: page(4 * MiB, 4 * MiB, (4 * MiB, MiB), (5 * MiB, MiB)),
            8 * MiB: page(8 * MiB, 8 * MiB),  # a page without changes
        }
    )
    areas = collect_changed_areas(q, 16 * MiB)
    assert q.asked == [0, 4 * MiB, 8 * MiB]
    assert areas == [(0, 64 << 10), (MiB, 64 << 10), (4 * MiB, 2 * MiB)]


def test_area_across_page_boundary_is_merged() -> None:
    q = RecordedQuery(
        {0: page(0, 2 * MiB, (MiB, MiB)), 2 * MiB: page(2 * MiB, 2 * MiB, (2 * MiB, MiB))}
    )
    assert collect_changed_areas(q, 4 * MiB) == [(MiB, 2 * MiB)]


def test_last_page_may_run_past_capacity_but_areas_may_not() -> None:
    q = RecordedQuery({0: page(0, 8 * MiB, (MiB, MiB))})
    assert collect_changed_areas(q, 3 * MiB) == [(MiB, MiB)]
    bad = RecordedQuery({0: page(0, 8 * MiB, (2 * MiB, 2 * MiB))})
    with pytest.raises(ChangedAreasInvalid, match="past the disk's capacity"):
        collect_changed_areas(bad, 3 * MiB)


@pytest.mark.parametrize(
    ("pages", "needle"),
    [
        ({0: page(0, MiB), MiB: page(MiB, 0)}, "does not advance"),
        ({0: page(0, 0)}, "does not advance"),
        ({0: page(MiB, MiB)}, "would be skipped"),
        ({0: page(0, 4 * MiB, (0, 2 * MiB), (MiB, MiB))}, "overlaps"),
        ({0: page(0, 4 * MiB, (2 * MiB, MiB), (0, MiB))}, "comes before"),
        ({0: page(0, 2 * MiB, (MiB, 2 * MiB))}, "outside its page"),
        ({0: page(0, 4 * MiB, (-512, 1024))}, "negative"),
    ],
)
def test_inconsistent_answers_are_refused(
    pages: dict[int, vim.VirtualMachine.DiskChangeInfo], needle: str
) -> None:
    with pytest.raises(ChangedAreasInvalid, match=needle):
        collect_changed_areas(RecordedQuery(pages), 4 * MiB)


def test_endless_small_pages_are_bounded() -> None:
    def creep(start: int) -> vim.VirtualMachine.DiskChangeInfo:
        return page(start, 512)

    with pytest.raises(ChangedAreasInvalid, match="more than 10 pages"):
        collect_changed_areas(creep, 4 * MiB, max_pages=10)


def test_change_id_uuid_and_reset_reasons() -> None:
    a = "52 de 2b 1c 4b 5c 71 4b-a3 0a 79 8e d2 a9 62 7e/446"
    b = "52 de 2b 1c 4b 5c 71 4b-a3 0a 79 8e d2 a9 62 7e/451"
    other = "52 00 2b 1c 4b 5c 71 4b-a3 0a 79 8e d2 a9 62 7e/3"
    assert change_id_uuid(a) == "52 de 2b 1c 4b 5c 71 4b-a3 0a 79 8e d2 a9 62 7e"
    assert change_id_uuid("*") is None
    assert cbt_reset_reason(a, b) is None
    reason = cbt_reset_reason(a, other)
    assert reason is not None and "reset" in reason
    assert "no CBT changeId" in (cbt_reset_reason(None, b) or "")
    assert "no CBT changeId" in (cbt_reset_reason(a, None) or "")
    assert "malformed" in (cbt_reset_reason("garbage", b) or "")
