"""Cost of encryption at rest: backup and restore time and stored size, encrypted vs
plaintext, of the same image in one run (issue 16's note). Usage:

    .venv/bin/python bench/crypto_cost.py [SIZE_MIB] [WORKDIR]

Runs the real CLI; prints one line per repository kind and the ratios.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import imagegen

EXE = str(Path(sys.executable).parent / "snapferry")


def run(*args: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([EXE, *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


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
        opened = run("list", "--repo", str(repo), env=base)  # the fixed cost of one command
        rows[enc] = (b, r, size_of(repo), same)
        print(f"{enc:8} backup {b:6.2f} s  restore {r:6.2f} s  stored {rows[enc][2]:>11} B  "
              f"list {opened:5.2f} s  restore identical: {same}")
    (bn, rn, sn, _), (be, re_, se, _) = rows["none"], rows["repokey"]
    print(f"encrypted/plain: backup {be / bn:.3f}x  restore {re_ / rn:.3f}x  "
          f"stored {se / sn:.4f}x (+{se - sn} B)")


if __name__ == "__main__":
    main()
