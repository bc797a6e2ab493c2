"""Cost of encryption at rest: backup and restore time and stored size, encrypted vs
plaintext, of the same image in one run (issue 16's note). Usage:

    .venv/bin/python bench/crypto_cost.py [SIZE_MIB] [WORKDIR]

Runs the real CLI; prints one line per repository kind and the ratios.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import imagegen

EXE = str(Path(sys.executable).parent / "snapferry")


CPU: dict[str, float] = {}


def run(*args: str, env: dict[str, str]) -> float:
    """Wall seconds of one CLI run; its CPU seconds (user + system, workers included)
    go to ``CPU[args[0]]``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([EXE, *args], check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[args[0]] = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return wall


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    work = Path(sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp())
    img = work / "disk.raw"
    imagegen.make_image(img, mib << 20, seed=1234)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFERRY_")}
    base["SNAPFERRY_PASSWORD"] = "bench passphrase"
    rows = {}
    for enc in ("none", "repokey"):
        repo = work / f"repo-{enc}"
        run("init", str(repo), "--encryption", enc, env=base)
        b = run("backup", str(img), "--repo", str(repo), "--name", "bench", env=base)
        bid = sorted(p.name for p in (repo / "snapshots").iterdir())[0]
        out = work / f"out-{enc}.raw"
        r = run("restore", "--repo", str(repo), bid, "--to", str(out), env=base)
        same = out.read_bytes() == img.read_bytes()
        out.unlink()
        bc, rc = CPU["backup"], CPU["restore"]
        opened = run("list", "--repo", str(repo), env=base)  # the fixed cost of one command
        info = json.loads(subprocess.run([EXE, "info", "--repo", str(repo), "--json"],
                                         check=True, env=base, capture_output=True).stdout)
        rows[enc] = (bc, rc, size_of(repo), same)
        print(f"{enc:8} backup {b:5.2f} s wall {bc:5.2f} s CPU  restore {r:5.2f} s wall "
              f"{rc:5.2f} s CPU  list {opened:4.2f} s wall {CPU['list']:4.2f} s CPU  "
              f"repository {rows[enc][2]} B, {info['chunks']} chunks "
              f"{info['chunk_bytes_stored']} B stored  identical: {same}")
    (bn, rn, sn, _), (be, re_, se, _) = rows["none"], rows["repokey"]
    print(f"encrypted/plain CPU: backup {be / bn:.3f}x  restore {re_ / rn:.3f}x  "
          f"stored {se / sn:.4f}x (+{se - sn} B)")


if __name__ == "__main__":
    main()
