"""Sequential read throughput of ``snapferry serve`` (nbdkit + the Python plugin) as a
ratio of ``qemu-nbd`` on the restored raw file, in one run, side by side.

    .venv/bin/python bench/serve_throughput.py [--size 512M] [--repeat 3]

For each of 1 and 4 connections (``nbdcopy --connections=N URI null:``) it times:
qemu-nbd -r on the restored raw file, and the export under the nbdkit thread models
serialize_requests (the default), serialize_all_requests and parallel, best of
``--repeat``, and prints the ratios with the load average. Quote the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from imagegen import make_bench_image  # noqa: E402

from snapferry.cli.common import parse_size  # noqa: E402
from snapferry.engine.serve.server import ExportOptions, NbdkitExport  # noqa: E402

MODELS = ("serialize_requests", "serialize_all_requests", "parallel")


def _cli(*args: str) -> None:
    env = dict(os.environ, SNAPFERRY_ENCRYPTION="none")
    subprocess.run([str(ROOT / ".venv/bin/snapferry"), *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def _copy_s(uri: str, conns: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", f"--connections={conns}", uri, "null:"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sf-servebench-"))
    try:
        img, repo, raw = work / "disk.img", work / "repo", work / "restored.raw"
        make_bench_image(img, parse_size(a.size), seed=3)
        _cli("init", str(repo))
        _cli("backup", str(img), "--repo", str(repo), "--name", "bench", "-q")
        _cli("restore", "latest:bench", "--repo", str(repo), "--to", str(raw), "-q")
        sock = work / "q.sock"
        qn = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "raw", "-e", "8",
                               "--socket", str(sock), str(raw)])
        while not sock.exists():
            time.sleep(0.05)
        times: dict[tuple[str, int], float] = {}
        exports: dict[str, NbdkitExport] = {}
        for m in MODELS:
            exports[m] = NbdkitExport(ExportOptions(repo=repo, backup_id=_latest(repo),
                                                    socket=work / f"{m}.sock", model=m))
            exports[m].start()
        try:
            for _ in range(a.repeat):  # interleaved: each round runs every server once
                for conns in (1, 4):
                    for name, uri in [("qemu-nbd", f"nbd+unix:///?socket={sock}")] + \
                            [(m, exports[m].uri) for m in MODELS]:
                        t = _copy_s(uri, conns)
                        times[(name, conns)] = min(times.get((name, conns), t), t)
        finally:
            for e in exports.values():
                e.stop()
            qn.terminate()
            qn.wait()
        load = os.getloadavg()
        print(f"image {a.size} ({img.stat().st_size} bytes), best of {a.repeat}; "
              f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        for conns in (1, 4):
            base = times[("qemu-nbd", conns)]
            row = ", ".join(f"{m} {base / times[(m, conns)]:.2f}x" for m in MODELS)
            print(f"{conns} connection(s): qemu-nbd {base:.2f} s; {row}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _latest(repo: Path) -> str:
    from snapferry.engine.store.repo import Repository

    return Repository.open(repo).list_backups()[-1].backup_id


if __name__ == "__main__":
    sys.exit(main())
