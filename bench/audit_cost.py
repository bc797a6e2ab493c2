"""What the changed-block audit costs on an incremental, at 0 %, 1 % and 5 %.

    .venv/bin/python bench/audit_cost.py [--size-mib 1024] [--rounds 3] [--dir DIR]

A mixed 1 GiB image (tests/imagegen.py) as qcow2 with a dirty bitmap, exported by
qemu-nbd; a full backup (default 256 KiB chunks); 1 % of the 64 KiB blocks rewritten;
then incrementals through the real CLI with ``--audit 0``, ``1`` and ``5`` in turn
(``rounds`` times, order rotated), each reporting wall time, the pipeline's copy time,
bytes read and the audit's sample. Prints a table and the per-backup chance of missing
a tracker that lost k chunks at each rate.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import imagegen  # noqa: E402
from nbdservers import NbdServers, qemu_io  # noqa: E402

from snapferry.engine.planning import miss_probability  # noqa: E402

RATES = (0.0, 1.0, 5.0)


def cli(*args: str) -> dict[str, object]:
    exe = ROOT / ".venv" / "bin" / "snapferry"
    r = subprocess.run([str(exe), *args, "--json"], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"snapferry {' '.join(args)} failed: {r.stderr}")
    return dict(json.loads(r.stdout))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    base = Path(a.dir or tempfile.mkdtemp(prefix="sfaudit-")).absolute()
    base.mkdir(parents=True, exist_ok=True)
    size = a.size_mib << 20
    raw = base / "disk.raw"
    imagegen.make_image(raw, size, seed=7)
    img = base / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img)], check=True)
    raw.unlink()
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    repo = base / "repo"
    cli("init", str(repo))
    with NbdServers(base) as servers:
        srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
        t0 = time.monotonic()
        full = cli("backup", srv.uri, "--repo", str(repo), "--name", "d", "--bitmap", "b0")
        full_s = time.monotonic() - t0
        srv.stop()
        blocks = size // (64 << 10)
        import random

        rng = random.Random(3)
        picks = rng.sample(range(blocks), blocks // 100)
        cmds = [f"write -P {i % 254 + 1:#x} {b * 65536} 65536" for i, b in enumerate(picks)]
        for i in range(0, len(cmds), 200):
            qemu_io(img, "qcow2", cmds[i : i + 200])
        srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
        rows: dict[float, list[dict[str, object]]] = {r: [] for r in RATES}
        for n in range(a.rounds):
            order = RATES[n % 3:] + RATES[: n % 3]
            for rate in order:
                t0 = time.monotonic()
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                res = cli("backup", srv.uri, "--repo", str(repo), "--name", "d",
                          "--bitmap", "b0", "--audit", f"{rate:g}")
                res["wall"] = time.monotonic() - t0
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # CLI + its workers
                res["cpu"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
                rows[rate].append(res)
    print(f"image {a.size_mib} MiB, {len(picks)} of {blocks} 64 KiB blocks rewritten; "
          f"full backup {full_s:.2f} s, read {int(full['bytes_read']) >> 20} MiB")
    print("audit  wall s (median)  copy s (median)  cpu s (median)  MiB read  sampled  "
          "population  mismatched")
    for rate in RATES:
        rs = rows[rate]
        wall = statistics.median(float(r["wall"]) for r in rs)  # type: ignore[arg-type]
        copy = statistics.median(float(r["copy_seconds"]) for r in rs)  # type: ignore[arg-type]
        cpu = statistics.median(float(r["cpu"]) for r in rs)  # type: ignore[arg-type]
        d = rs[-1]["disks"][0]  # type: ignore[index]
        au = d["cbt_audit"] or {"sampled": 0, "population": 0, "mismatched": 0}
        print(f"{rate:4g} %  {wall:14.2f}  {copy:15.2f}  {cpu:14.2f}  "
              f"{d['bytes_read'] / 2**20:8.1f}  "
              f"{au['sampled']:7d}  {au['population']:10d}  {au['mismatched']:10d}")
    pop = max(int((r["disks"][0]["cbt_audit"] or {}).get("population", 0))  # type: ignore[index]
              for rs in rows.values() for r in rs)
    print(f"chance of missing a tracker that lost k clean chunks (population {pop}):")
    for rate in RATES[1:]:
        n = -(-int(pop * rate) // 100)
        cells = ", ".join(f"k={k}: {miss_probability(pop, n, k):.3g}" for k in (1, 4, 16, 64, 256))
        print(f"  {rate:g} % (uniform {n}): {cells}")


if __name__ == "__main__":
    main()
