"""The coordinator end to end on the real lab VM: full + two incrementals while the guest
writes, every restore point restored and checked (e2fsck, file contents), incrementals
reading only the chunks the dirty bitmap names.

Nothing is mocked: QEMU (TCG), qemu-ga, QEMU's NBD server, the project's NBD client,
the reader pool and the repository are all real. ``RecordingHv`` only remembers the
plans the backend made, to know what the bitmap reported.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from coordvm import (
    CHUNK,
    check_restore_point,
    guest_ticker,
    make_hv,
    max_gap_ms,
    new_repo,
    run,
    vm_work_dir,
    write_known,
)
from labvm import assert_vm_clean, bitmaps, lab_vm

from snapferry.engine.backup import merge_runs
from snapferry.engine.qemu.agent import GuestAgent
from snapferry.lab.vm import LabVm

pytestmark = pytest.mark.vm
__all__ = ["lab_vm"]  # the session fixture, imported for pytest

TICK_LOG = "/data0/tick.log"





def ensure_filler(vm: LabVm, mib: int = 4) -> None:
    """Real file data on /data0 (once per VM), so that the disk's allocated size is
    several MiB and "an incremental reads far less than a full" means something."""
    cmd = (f"[ -s /data0/filler.bin ] || dd if=/dev/urandom of=/data0/filler.bin bs=65536 "
           f"count={mib * 16} 2>/dev/null; sync")
    with GuestAgent(vm.agent_socket, timeout=60.0) as ga:
        code, _out, err = ga.exec_wait("/bin/sh", ["-c", cmd], timeout=120.0)
    assert code == 0, err


def dirty_chunks(changed: list[tuple[int, int]], size: int) -> int:
    return sum(n for _f, n in merge_runs(changed, CHUNK, size))


def test_full_and_two_incrementals_while_the_guest_writes(
    lab_vm: LabVm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = vm_work_dir(lab_vm, tmp_path, monkeypatch)
    repo = new_repo(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ensure_filler(lab_vm)
    expected: dict[str, bytes] = {}
    rounds = []
    pauses: list[tuple[float, float | None]] = []
    for n in range(3):
        # Known files before the freeze; round 2 also rewrites two files of round 0, so
        # restore point 0 must keep the old bytes and 2 the new ones.
        expected.update(write_known(lab_vm, f"round{n}", 3))
        if n == 2:
            rewrite = write_known(lab_vm, "round0", 2, size=9000)
            expected.update(rewrite)
        hv = make_hv(lab_vm, work)
        t0 = time.monotonic()
        with guest_ticker(lab_vm, TICK_LOG) as ticks:
            r = run(lab_vm, work, repo, mode="auto", hv=hv)
        took = time.monotonic() - t0
        pauses.append((max_gap_ms(ticks), r.freeze_ms))
        print(f"backup {n}: {r.backup.mode}, {took:.1f} s, freeze {r.freeze_ms} ms, "
              f"read {r.backup.bytes_read} B, phases {r.phase_seconds}, "
              f"largest guest write gap {pauses[-1][0]:.0f} ms over {len(ticks)} ticks")
        rounds.append((r, dict(expected), hv.plans))
        assert_vm_clean(lab_vm, work)

    full, _files, _plans = rounds[0]
    allocated = {d.name: d.bytes_read for d in full.backup.disks}
    assert allocated["disk0"] > 0
    prev_id: str | None = None
    for n, (r, files, plans) in enumerate(rounds):
        m = repo.load_manifest(r.backup.backup_id)
        assert m.mode == ("full" if n == 0 else "incremental")
        assert m.parent == prev_id
        assert m.consistency == "filesystem" and r.consistency == "filesystem"
        assert m.quiesced is True and r.quiesced
        assert m.freeze_ms is not None and m.freeze_ms > 0
        assert r.committed and r.attempts == 1
        for entry in m.disks:
            bitmap = entry.tracking.get("bitmap")
            assert isinstance(bitmap, str) and bitmap.startswith("snapferry-")
        if n > 0:
            by_name = {p.name: p for p in plans}
            for d in r.backup.disks:
                changed = by_name[d.name].changed
                assert changed is not None, f"{d.name}: incremental without dirty ranges"
                bound = dirty_chunks(changed, d.virtual_size) * CHUNK
                assert d.bytes_read <= bound, (d.name, d.bytes_read, bound)
                assert d.bytes_read <= allocated[d.name] // 4 + CHUNK, (d.name, d.bytes_read)
            disk0 = next(d for d in r.backup.disks if d.name == "disk0")
            assert disk0.bytes_read > 0  # the known files and the workload were written
        prev_id = r.backup.backup_id
        check_restore_point(repo, r.backup.backup_id, files, scratch)
        check_restore_point(repo, r.backup.backup_id, {}, scratch, disk="disk1")

    # Chained bookkeeping: only the newest restore point's bitmap is left recording.
    bm = bitmaps(lab_vm)
    last = repo.load_manifest(rounds[-1][0].backup.backup_id).disks[0].tracking["bitmap"]
    assert bm[last]["recording"] is True
    for r, _f, _p in rounds[:-1]:
        old = repo.load_manifest(r.backup.backup_id).disks[0].tracking["bitmap"]
        assert old not in bm
    print("guest-visible pause vs freeze window (ms):", pauses)
