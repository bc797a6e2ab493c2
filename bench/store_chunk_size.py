"""Macro benchmark behind the store defaults (chunk size, zstd level): see docs/chunk-size.md.

    .venv/bin/python bench/store_chunk_size.py IMAGE [--workdir DIR] [--sizes 64K,256K,1M,4M]

IMAGE should be a realistic disk (e.g. an ext4 image filled with real files, holes
left). For each chunk size: a full backup (one process, the worker hot path done
sequentially), an incremental after rewriting 1 % of the 64 KiB blocks at random, a
restore, and the repository's size on disk. Then zstd level 1 vs 3 on the image's
non-zero chunks. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from store_helpers import backup_image, chunks_of, overwrite_random

from snapferry.engine.restore import restore
from snapferry.engine.store import DEFAULT_ZSTD_LEVEL, Repository, encode_chunk, is_zero
from snapferry.engine.verify import repo_info

KiB = 1024
MiB = KiB * KiB


def parse_size(s: str) -> int:
    mult = {"K": KiB, "M": MiB}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def human(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def bench_chunk_size(
    image: Path, work: Path, cs: int, block_writes: int, level: int
) -> dict[str, float]:
    d = work / f"cs{cs}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    img = d / "disk.img"
    os.system(f"cp --sparse=always {image} {img}")
    repo = Repository.init(d / "repo", chunk_size=cs, zstd_level=level)
    t, c = time.perf_counter(), time.process_time()
    full = backup_image(repo, {"sda": img})
    t_full, c_full = time.perf_counter() - t, time.process_time() - c
    size_full = repo_info(repo)["size_on_disk"]
    offs = overwrite_random(img, block_writes, 64 * KiB, seed=42)
    changed = chunks_of(offs, 64 * KiB, cs)
    t, c = time.perf_counter(), time.process_time()
    inc = backup_image(repo, {"sda": img}, parent=full, changed={"sda": changed})
    t_inc, c_inc = time.perf_counter() - t, time.process_time() - c
    info = repo_info(repo)
    out = d / "restored.raw"
    t = time.perf_counter()
    restore(repo, inc.backup_id, to=out, workers=2)
    t_restore = time.perf_counter() - t
    ok = out.read_bytes() == img.read_bytes()
    e = inc.disks[0]
    res = {
        "cs": cs,
        "full_s": t_full,
        "full_cpu": c_full,
        "inc_cpu": c_inc,
        "full_chunks": full.disks[0].chunks_new,
        "full_on_disk": size_full,
        "inc_s": t_inc,
        "inc_read": e.bytes_read,
        "inc_stored": e.bytes_stored,
        "inc_on_disk": info["size_on_disk"] - size_full,
        "restore_s": t_restore,
        "restore_ok": ok,
        "files": info["chunks"],
    }
    shutil.rmtree(d, ignore_errors=True)
    return res


def bench_levels(image: Path, cs: int, levels: list[int]) -> list[tuple[int, float, int, int]]:
    chunks: list[bytes] = []
    with open(image, "rb") as f:
        while True:
            b = f.read(cs)
            if not b:
                break
            if not is_zero(b):
                chunks.append(b)
    raw = sum(len(c) for c in chunks)
    out = []
    for lvl in levels:
        t = time.process_time()
        stored = sum(len(encode_chunk(c, level=lvl)) for c in chunks)
        out.append((lvl, time.process_time() - t, raw, stored))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sf-bench-work"))
    ap.add_argument("--sizes", default="64K,256K,1M,4M")
    ap.add_argument("--levels", default="1,3")
    ap.add_argument("--level", type=int, default=DEFAULT_ZSTD_LEVEL)
    ap.add_argument("--level-chunk", default="1M")
    a = ap.parse_args()
    size = a.image.stat().st_size
    writes = max(1, size // (64 * KiB) // 100)
    print(f"image {a.image}: {human(size)}, {writes} random 64 KiB writes (1 %), zstd {a.level}\n")
    print("| chunk | full s (cpu) | full on disk | chunk files | incr s (cpu) | incr read "
          "| incr new stored | incr on disk | restore s | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in a.sizes.split(","):
        r = bench_chunk_size(a.image, a.workdir, parse_size(s), writes, a.level)
        print(
            f"| {s} | {r['full_s']:.2f} ({r['full_cpu']:.2f}) | {human(r['full_on_disk'])} | "
            f"{r['files']} | {r['inc_s']:.2f} ({r['inc_cpu']:.2f}) | {human(r['inc_read'])} | "
            f"{human(r['inc_stored'])} | "
            f"{human(r['inc_on_disk'])} | {r['restore_s']:.2f} | {r['restore_ok']} |",
            flush=True,
        )
    print(f"\nzstd levels on non-zero {a.level_chunk} chunks (one core):\n")
    print("| level | cpu seconds | MB/s | raw | stored | ratio |")
    print("|---|---|---|---|---|---|")
    levels = [int(x) for x in a.levels.split(",")]
    for lvl, secs, raw, stored in bench_levels(a.image, parse_size(a.level_chunk), levels):
        print(f"| {lvl} | {secs:.2f} | {raw / secs / 1e6:.0f} | {human(raw)} | {human(stored)} "
              f"| {raw / stored:.2f} |")


if __name__ == "__main__":
    main()
