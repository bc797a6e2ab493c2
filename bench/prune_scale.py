"""Prune at scale: a generated repository of 50 restore points over ~1 million chunks.

Usage: python bench/prune_scale.py DIR [--points 50] [--per-point 100000] [--stride 18400]

Generation goes straight through the engine API, no image files: chunk ``i`` is 64 KiB
whose first 8 bytes are ``i`` and next 512 bytes pseudo-random (so every chunk is
distinct and stores as ~530 bytes of zstd), written by a ``ChunkWriter`` into real
packs and index files; restore point ``k`` is one disk of ``per-point`` chunks starting
at chunk ``k*stride``, committed with ``commit_restore_point`` (pages and all). Then
``forget --keep-last 25`` and a prune in a fresh process whose time and peak RSS are
reported, with the unreferenced bytes before and the bytes freed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CS = 64 << 10


def generate(root: Path, points: int, per: int, stride: int) -> None:
    from snapferry.engine.store import DiskEntry, DiskIndex, Manifest, Repository
    from snapferry.engine.store.hashing import chunk_id, strong_digest

    repo = Repository.init(root, chunk_size=CS, pack_size=8 << 20)
    total = (points - 1) * stride + per
    ids = np.zeros((total, 16), dtype=np.uint8)
    rng = np.random.default_rng(1)
    buf = bytearray(CS)
    t0 = time.monotonic()
    with repo.lock():
        w = repo.writer_spec().open()
        for i in range(total):
            buf[0:8] = i.to_bytes(8, "big")
            buf[8:520] = rng.bytes(512)
            mv = memoryview(buf)
            cid = chunk_id(repo.seed, mv)
            w.store(cid, mv, strong_digest(mv))
            ids[i] = np.frombuffer(cid, dtype=np.uint8)
        written = w.flush()
        w.close()
    print(f"generated {total} chunks in {time.monotonic() - t0:.0f} s", flush=True)
    for k in range(points):
        with repo.lock():
            known = repo.index_names()
            size = per * CS
            idx = DiskIndex(size, CS, np.ascontiguousarray(ids[k * stride : k * stride + per]),
                            page_entries=repo.page_entries)
            m = Manifest(backup_id=f"2026{1 + k // 28:02d}{1 + k % 28:02d}T000000Z-{k:08x}",
                         vm="big", chunk_size=CS, consistency="n/a",
                         created=f"2026-{1 + k // 28:02d}-{1 + k % 28:02d}T00:00:00Z",
                         disks=[DiskEntry(name="disk0", virtual_size=size)])
            repo.commit_restore_point(m, {"disk0": idx}, written=written if k == 0 else None,
                                      known_at_start=known)
    print(f"committed {points} restore points in {time.monotonic() - t0:.0f} s", flush=True)


def run_prune(root: str) -> None:
    from snapferry.engine.store import Repository
    from snapferry.engine.store.prune import peak_rss_mib, prune

    t0 = time.monotonic()
    rep = prune(Repository.open(root))
    out = rep.to_json()
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--points", type=int, default=50)
    ap.add_argument("--per-point", type=int, default=100_000)
    ap.add_argument("--stride", type=int, default=18_400)
    ap.add_argument("--prune-only", action="store_true")
    a = ap.parse_args()
    if a.prune_only:
        run_prune(a.dir)
        return
    root = Path(a.dir)
    generate(root, a.points, a.per_point, a.stride)
    from snapferry.engine.forget import forget
    from snapferry.engine.retention import Policy
    from snapferry.engine.store import Repository

    res = forget(Repository.open(root), policy=Policy(last=a.points // 2))
    print(f"forgot {len(res.removed)} restore points", flush=True)
    import os

    env = dict(os.environ, SNAPFERRY_PRUNE_TRACE="1")
    r = subprocess.run([sys.executable, __file__, str(root), "--prune-only"],
                       capture_output=True, text=True, check=True, env=env)
    print(r.stderr + r.stdout, end="")


if __name__ == "__main__":
    main()
