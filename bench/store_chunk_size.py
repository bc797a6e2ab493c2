"""Macro benchmark behind the store defaults (chunk size, zstd level): docs/chunk-size.md.

    .venv/bin/python bench/store_chunk_size.py IMAGE [--sizes 64K,128K,256K,512K]
        [--levels 1,3,6,9,19] [--workers 2]

IMAGE should be a realistic disk (e.g. ``mke2fs -t ext4 -d /usr/share IMAGE 2G``). For
each chunk size, through the real pipeline (``run_backup``, worker processes, packs):
a full backup, an incremental after rewriting 1 % of the 64 KiB blocks at random, a
restore, the stored bytes and the chunk-index table's bytes; beside it ``zstd -T0 -3``
over the same image. Then a full backup at each zstd level at one chunk size. Prints
Markdown tables (one run: quote ratios).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from store_helpers import overwrite_random

from snapferry.engine.backup import BackupOptions, DiskInput, run_backup
from snapferry.engine.restore import restore
from snapferry.engine.sources.file import FileSource
from snapferry.engine.store import Repository
from snapferry.engine.verify import repo_info

KiB = 1024
MiB = KiB * KiB


def parse_size(s: str) -> int:
    mult = {"K": KiB, "M": MiB}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def cpu() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def zstd_time(image: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["zstd", "-T0", "-3", "-q", "-f", "-c", str(image)],
                   stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def one(image: Path, work: Path, cs: int, level: int, workers: int, incr: bool) -> dict[str, float]:
    d = work / f"cs{cs}-l{level}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    repo = Repository.init(d / "repo", chunk_size=cs, zstd_level=level)
    opts = BackupOptions(workers=workers, verify="quick", no_parent=True)
    t, c = time.perf_counter(), cpu()
    full = run_backup(repo, "vm", [DiskInput("sda", FileSource(image))], opts, consistency="n/a")
    res: dict[str, float] = {"full_s": time.perf_counter() - t, "full_cpu": cpu() - c}
    info = repo_info(repo)
    res["stored"] = info["size_on_disk"]
    res["chunks"] = info["chunks"]
    res["index_mem"] = info["index_memory_bytes"]
    if incr:
        img = d / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(img)], check=True)
        size = img.stat().st_size
        offs = overwrite_random(img, max(1, size // (64 * KiB) // 100), 64 * KiB, seed=42)
        changed = [(o, 64 * KiB) for o in sorted(offs)]
        t, c = time.perf_counter(), cpu()
        inc = run_backup(repo, "vm", [DiskInput("sda", FileSource(img), changed=changed)],
                         BackupOptions(workers=workers, verify="quick"), consistency="n/a")
        res["inc_s"] = time.perf_counter() - t
        res["inc_cpu"] = cpu() - c
        res["inc_read"] = inc.bytes_read
        res["changed"] = len(offs) * 64 * KiB
        out = d / "restored.raw"
        t = time.perf_counter()
        restore(repo, inc.backup_id, to=out, workers=2)
        res["restore_s"] = time.perf_counter() - t
        res["ok"] = float(subprocess.run(["cmp", "-s", str(out), str(img)]).returncode == 0)
        del full
    shutil.rmtree(d, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sf-bench-work"))
    ap.add_argument("--sizes", default="64K,128K,256K,512K")
    ap.add_argument("--levels", default="1,3,6,9,19")
    ap.add_argument("--level-chunk", default="256K")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    size = a.image.stat().st_size
    used = os.stat(a.image).st_blocks * 512
    z = zstd_time(a.image)
    print(f"image {a.image}: {size / MiB:.0f} MiB virtual, {used / MiB:.0f} MiB allocated; "
          f"zstd -T0 -3: {z:.2f} s\n")
    print("| chunk | full s | full ÷ zstd | full CPU s | stored MiB | chunks | index table "
          "| incr s | incr ÷ full | incr read ÷ changed | restore s | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in a.sizes.split(","):
        r = one(a.image, a.workdir, parse_size(s), 1, a.workers, True)
        print(f"| {s} | {r['full_s']:.2f} | {r['full_s'] / z:.2f} | {r['full_cpu']:.1f} | "
              f"{r['stored'] / MiB:.0f} | {int(r['chunks'])} | {r['index_mem'] / KiB:.0f} KiB | "
              f"{r['inc_s']:.2f} | {100 * r['inc_s'] / r['full_s']:.0f} % | "
              f"{r['inc_read'] / r['changed']:.1f} | {r['restore_s']:.2f} | "
              f"{bool(r['ok'])} |", flush=True)
    cs = parse_size(a.level_chunk)
    print(f"\nzstd level at {a.level_chunk} chunks (full backup, {a.workers} workers):\n")
    print("| level | full s | full ÷ zstd -T0 -3 | CPU s | stored MiB |")
    print("|---|---|---|---|---|")
    for lvl in (int(x) for x in a.levels.split(",")):
        r = one(a.image, a.workdir, cs, lvl, a.workers, False)
        print(f"| {lvl} | {r['full_s']:.2f} | {r['full_s'] / z:.2f} | {r['full_cpu']:.1f} | "
              f"{r['stored'] / MiB:.0f} |", flush=True)


if __name__ == "__main__":
    main()
