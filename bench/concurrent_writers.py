"""Concurrent writers: N backups into one repository at once against one after another.

    .venv/bin/python bench/concurrent_writers.py --workdir /var/tmp/conc [--count 4] [--size 1G]
        [--repeat 3] [--out bench/out/concurrent.json]

Once per workdir (kept, reused): ``--count`` deterministic sparse raw images of
``--size`` each (``bench/imagegen.py``, seeds 1..N: different data, the same mix of
text, binary, random, zeros and holes). Then, ``--repeat`` times, alternating which
goes first:

* **one by one**: a fresh repository, ``snapferry backup IMAGE --name vmK`` for each
  image in turn (the CLI, default settings: encrypted, workers one per CPU);
* **at once**: a fresh repository, the same N commands started together.

Timed: the wall time from the first command's start to the last one's end. Afterwards
(untimed) every image of the concurrent repository is restored and compared byte for
byte and ``snapferry verify --read-data`` must pass. Prints each round, the median of
at-once / one-by-one (< 1: concurrency is faster; the goal of issue 9 is <= 1) and the
load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import parse_size
from imagegen import make_bench_image

PASSWORD = "snapferry-bench"


def env() -> dict[str, str]:
    return dict(os.environ, SNAPFERRY_PASSWORD=PASSWORD, SNAPFERRY_NEW_PASSWORD=PASSWORD)


def sf() -> str:
    return str(Path(sys.executable).parent / "snapferry")


def images(work: Path, count: int, size: int) -> list[Path]:
    """The images of this workdir, built once for a given (count, size)."""
    stamp = work / "images.json"
    paths = [work / f"img{k}.raw" for k in range(count)]
    recipe = {"count": count, "size": size}
    try:
        if json.loads(stamp.read_text()) == recipe and all(p.is_file() for p in paths):
            return paths
    except (OSError, ValueError):
        pass
    work.mkdir(parents=True, exist_ok=True)
    print(f"building {count} images of {size / 2**30:.2f} GiB in {work} ...", file=sys.stderr)
    for k, p in enumerate(paths):
        make_bench_image(p, size, seed=k + 1)
    stamp.write_text(json.dumps(recipe))
    return paths


def fresh_repo(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sf(), "init", str(path)], env=env(), check=True, capture_output=True)


def backup_cmd(repo: Path, img: Path, k: int) -> list[str]:
    return [sf(), "backup", str(img), "--repo", str(repo), "--name", f"vm{k}", "--json"]


def one_by_one(repo: Path, imgs: list[Path]) -> tuple[float, list[str]]:
    fresh_repo(repo)
    t0 = time.perf_counter()
    ids = []
    for k, img in enumerate(imgs):
        r = subprocess.run(backup_cmd(repo, img, k), env=env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"backup {k} failed: {r.stderr.strip()[-400:]}")
        ids.append(json.loads(r.stdout)["backup_id"])
    return time.perf_counter() - t0, ids


def at_once(repo: Path, imgs: list[Path]) -> tuple[float, list[str]]:
    fresh_repo(repo)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(backup_cmd(repo, img, k), env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for k, img in enumerate(imgs)]
    outs = [p.communicate() for p in procs]
    dt = time.perf_counter() - t0
    ids = []
    for k, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        if p.returncode != 0:
            raise SystemExit(f"concurrent backup {k} failed: {err.strip()[-400:]}")
        ids.append(json.loads(out)["backup_id"])
    return dt, ids


def check(repo: Path, imgs: list[Path], ids: list[str], work: Path) -> bool:
    """Every restore point restores byte-identical; verify --read-data passes."""
    ok = True
    for img, bid in zip(imgs, ids, strict=True):
        out = work / "restored.raw"
        out.unlink(missing_ok=True)
        subprocess.run([sf(), "restore", bid, "--repo", str(repo), "--to", str(out)],
                       env=env(), check=True, capture_output=True)
        same = subprocess.run(["cmp", "-s", str(out), str(img)]).returncode == 0
        out.unlink(missing_ok=True)
        ok = ok and same
    v = subprocess.run([sf(), "verify", "--read-data", "--repo", str(repo)], env=env(),
                       capture_output=True, text=True)
    return ok and v.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="kept between runs")
    ap.add_argument("--count", type=int, default=4, help="backups at once (default 4)")
    ap.add_argument("--size", default="1G", help="virtual size of each image (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--out", type=Path, help="JSON of every timing")
    a = ap.parse_args(argv)
    if a.count < 2 or a.repeat < 1:
        ap.error("--count must be >= 2 and --repeat >= 1")
    work: Path = a.workdir.resolve()
    imgs = images(work, a.count, parse_size(a.size))
    for img in imgs:  # warm the page cache: both modes read the same cached bytes
        with open(img, "rb") as f:
            while f.read(8 << 20):
                pass
    load0 = os.getloadavg()
    rounds: list[dict[str, Any]] = []
    for i in range(a.repeat):
        order = ("one_by_one", "at_once") if i % 2 == 0 else ("at_once", "one_by_one")
        got: dict[str, Any] = {}
        for mode in order:
            fn = one_by_one if mode == "one_by_one" else at_once
            got[mode], got[f"{mode}_ids"] = fn(work / f"repo-{mode}", imgs)
        got["ratio"] = got["at_once"] / got["one_by_one"]
        rounds.append(got)
        print(f"round {i + 1}: one by one {got['one_by_one']:.2f} s, at once "
              f"{got['at_once']:.2f} s, at once / one by one {got['ratio']:.2f}")
    same = check(work / "repo-at_once", imgs, rounds[-1]["at_once_ids"], work)
    load1 = os.getloadavg()
    med = statistics.median(r["ratio"] for r in rounds)
    print(f"median at once / one by one: {med:.2f} (goal <= 1); restores identical and "
          f"verify --read-data ok: {same}; load average {load0[0]:.1f} before, "
          f"{load1[0]:.1f} after ({os.cpu_count()} cores)")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"settings": {"count": a.count, "size": a.size,
                                                  "repeat": a.repeat},
                                     "rounds": rounds, "median_ratio": med,
                                     "restores_identical_and_verified": same,
                                     "load_before": load0, "load_after": load1}, indent=2))
    for mode in ("one_by_one", "at_once"):
        shutil.rmtree(work / f"repo-{mode}", ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
