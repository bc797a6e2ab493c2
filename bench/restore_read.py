"""Restore and serve throughput against nbdcopy from qemu-nbd, side by side in one run.

    .venv/bin/python bench/restore_read.py --workdir /tmp/rr --size 2G [--repeat 3]
    .venv/bin/python bench/restore_read.py --workdir /tmp/rr-tree --size 4G \
        --tree /usr/share,/usr/lib/python3

Once per workdir (kept, reused by later runs): the image of ``bench/compare.py``
(generated, or ext4 of real files with ``--tree``), its 1 % change through QEMU, and a
repository (encrypted, as ``init`` makes by default; ``--encryption none`` for plain)
holding a full backup of the base and an incremental of the changed image. Timed, in
alternation, ``--repeat`` times (the best of each is reported, ratios from the bests):

* ``snapferry restore INCR --to out.raw`` (the CLI, fdatasync included), and with
  ``--baseline DIR`` the same command of the snapferry package in DIR (an older one);
* ``nbdcopy`` from ``qemu-nbd`` (the changed qcow2) to a file, without and with
  ``--flush`` (nbdcopy does not sync the file unless asked; restore does);
* ``nbdcopy -C 1`` and ``-C 4`` of ``snapferry serve INCR`` to ``null:``, against the
  same from ``qemu-nbd`` serving the restored raw file.

``--target-dir /dev/shm`` writes both outputs to tmpfs: the disk's write-out speed (which
bounds every durable copy, and varies from hour to hour on a shared host) is then out of
the comparison, and what is left is each tool's own work.

Prints one table and the load average before and after; ``--out`` keeps the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (
    BITMAP,
    build_images,
    nbd_uri,
    parse_size,
    qemu_nbd,
    run,
)

PASSWORD = "snapferry-bench"


def env() -> dict[str, str]:
    return dict(os.environ, SNAPFERRY_PASSWORD=PASSWORD, SNAPFERRY_NEW_PASSWORD=PASSWORD)


def sf_exe() -> str:
    return str(Path(sys.executable).parent / "snapferry")


def sf_json(*args: str) -> dict[str, Any]:
    out = run([sf_exe(), *args, "--json"], env=env()).stdout
    obj: dict[str, Any] = json.loads(out)
    return obj


def prepare(work: Path, size: int, tree: list[str], encryption: str) -> dict[str, Any]:
    state = work / "state.json"
    if state.exists():
        st: dict[str, Any] = json.loads(state.read_text())
        if st.get("encryption") == encryption:
            return st
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "changed.qcow2").exists():
        print("building images ...", file=sys.stderr)
        build_images(work, size, 1, 0.01, tree)
        for p in ("base.raw",):
            (work / p).unlink(missing_ok=True)
    repo = work / f"repo-{encryption}"
    shutil.rmtree(repo, ignore_errors=True)
    run([sf_exe(), "init", str(repo), "--encryption", encryption], env=env())
    sock = Path(tempfile.mkdtemp(prefix="rrb-"))
    try:
        with qemu_nbd(work / "base.qcow2", sock / "b.sock") as base:
            full = sf_json("backup", base, "--repo", str(repo), "--name", "bench")
        with qemu_nbd(work / "changed.qcow2", sock / "c.sock", bitmap=BITMAP) as chg:
            inc = sf_json("backup", chg, "--repo", str(repo), "--name", "bench",
                          "--bitmap", BITMAP, "--parent", str(full["backup_id"]))
    finally:
        shutil.rmtree(sock, ignore_errors=True)
    st = {"encryption": encryption, "repo": str(repo), "full": full["backup_id"],
          "incr": inc["backup_id"], "virtual_size": os.stat(work / "changed.raw").st_size}
    state.write_text(json.dumps(st))
    return st


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for t in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, IndexError, ValueError):
            continue
    return total


def timed(cmd: list[str], server: int | None = None, **kw: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command plus of ``server``'s process tree)."""
    c0, s0 = _children_cpu(), tree_cpu(server) if server else 0.0
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    dt = time.perf_counter() - t0
    cpu = _children_cpu() - c0 + ((tree_cpu(server) - s0) if server else 0.0)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr.strip()[-400:]}")
    return dt, cpu


@contextmanager
def serving(repo: str, bid: str) -> Iterator[tuple[str, int]]:
    d = Path(tempfile.mkdtemp(prefix="rrs-"))
    proc = subprocess.Popen([sf_exe(), "serve", bid, "--repo", repo, "--socket",
                             str(d / "s.sock"), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        text = ""
        while True:  # one JSON object, maybe over several lines
            line = proc.stdout.readline()
            if not line:
                raise SystemExit(f"snapferry serve failed: {proc.communicate()[1]}")
            text += line
            try:
                info = json.loads(text)
                break
            except json.JSONDecodeError:
                continue
        yield str(info["uri"]), proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def qemu_nbd_served(image: Path, fmt: str) -> Iterator[tuple[str, int]]:
    d = Path(tempfile.mkdtemp(prefix="rrq-"))
    sock = d / "q.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "4", f"--socket={sock}", "-f",
                             fmt, str(image)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(600):
            if sock.exists():
                break
            time.sleep(0.05)
        time.sleep(0.1)
        yield nbd_uri(sock), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="kept between runs")
    ap.add_argument("--size", default="2G", help="virtual size (default 2G)")
    ap.add_argument("--tree", default="", help="comma list of dirs: ext4 image of real files")
    ap.add_argument("--encryption", default="repokey", choices=("repokey", "none"),
                    help="the repository's encryption (default repokey)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--skip-serve", action="store_true", help="restore rows only")
    ap.add_argument("--out", type=Path, help="JSON of every timing")
    ap.add_argument("--target-dir", type=Path, default=None, metavar="DIR",
                    help="write the restored and the nbdcopy'd files here (default: the "
                         "workdir); /dev/shm takes the disk out of the comparison")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="also time the restore of the snapferry package found in DIR "
                         "(PYTHONPATH=DIR), e.g. an older version, in the same rounds")
    a = ap.parse_args(argv)
    tree = [t for t in a.tree.split(",") if t]
    st = prepare(a.workdir, parse_size(a.size), tree, a.encryption)
    work: Path = a.workdir
    size = int(st["virtual_size"])
    target: Path = a.target_dir or work
    out = target / "out.raw"
    nbd_out = target / "nbdcopy.raw"
    times: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    load0 = os.getloadavg()

    def add(k: str, v: tuple[float, float]) -> None:
        times.setdefault(k, []).append(v[0])
        cpus.setdefault(k, []).append(v[1])

    with qemu_nbd_served(work / "changed.qcow2", "qcow2") as (chg, qpid):
        run(["nbdcopy", chg, "null:"])  # warm the page cache
        for _ in range(a.repeat):
            out.unlink(missing_ok=True)
            rst = ["restore", "--repo", st["repo"], st["incr"], "--to", str(out), "--format",
                   "raw"]
            add("restore", timed([sys.executable, "-m", "snapferry.cli", *rst], env=env()))
            if a.baseline:  # another snapferry's restore, same run (PYTHONPATH=DIR)
                out.unlink(missing_ok=True)
                add("restore_baseline", timed([sys.executable, "-m", "snapferry.cli", *rst],
                                              env=env() | {"PYTHONPATH": str(a.baseline)}))
            nbd_out.unlink(missing_ok=True)
            add("nbdcopy_file", timed(["nbdcopy", chg, str(nbd_out)], qpid))
            nbd_out.unlink(missing_ok=True)
            add("nbdcopy_file_flush", timed(["nbdcopy", "--flush", chg, str(nbd_out)], qpid))
    same = subprocess.run(["cmp", str(out), str(work / "changed.raw")]).returncode == 0
    nbd_out.unlink(missing_ok=True)
    if a.target_dir is not None and a.skip_serve:
        out.unlink(missing_ok=True)
    if not a.skip_serve:
        with serving(st["repo"], st["incr"]) as (sv, spid), \
                qemu_nbd_served(out, "raw") as (qr, rpid):
            run(["nbdcopy", qr, "null:"])
            for _ in range(a.repeat):
                for c in ("1", "4"):
                    add(f"serve_c{c}", timed(["nbdcopy", "-C", c, sv, "null:"], spid))
                    add(f"qemu_raw_c{c}", timed(["nbdcopy", "-C", c, qr, "null:"], rpid))
    load1 = os.getloadavg()
    best = {k: min(v) for k, v in times.items()}
    cpu = {k: min(v) for k, v in cpus.items()}
    ratios = {
        "restore_vs_nbdcopy_file": best["nbdcopy_file"] / best["restore"],
        "restore_vs_nbdcopy_file_flush": best["nbdcopy_file_flush"] / best["restore"],
        "restore_cpu_vs_nbdcopy_file_flush_cpu": cpu["restore"] / cpu["nbdcopy_file_flush"],
    }
    if a.baseline:
        ratios["restore_vs_baseline_restore"] = best["restore_baseline"] / best["restore"]
        ratios["restore_cpu_vs_baseline_cpu"] = cpu["restore"] / cpu["restore_baseline"]
    if not a.skip_serve:
        for c in ("1", "4"):
            ratios[f"serve_vs_qemu_nbd_c{c}"] = best[f"qemu_raw_c{c}"] / best[f"serve_c{c}"]
            ratios[f"serve_cpu_vs_qemu_nbd_cpu_c{c}"] = cpu[f"serve_c{c}"] / cpu[f"qemu_raw_c{c}"]
    res = {"settings": vars(a) | {"workdir": str(work), "out": str(a.out)}, "state": st,
           "times": times, "cpu": cpus, "best": best, "best_cpu": cpu, "ratios": ratios,
           "cmp_ok": same, "load_before": load0, "load_after": load1, "nproc": os.cpu_count()}
    for k, v in sorted(best.items()):
        print(f"{k:20s} {v:6.2f} s {size / v / 1e9:5.2f} GB/s virt, cpu {cpu[k]:5.2f} s  (runs: "
              + ", ".join(f"{x:.2f}" for x in times[k]) + ")")
    for k, v in ratios.items():
        print(f"{k:32s} {v:.2f}x")
    print(f"restored image identical: {same}; load average {load0[0]:.1f} before, "
          f"{load1[0]:.1f} after ({os.cpu_count()} cores)")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2, default=str))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
