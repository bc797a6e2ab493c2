"""S3 repository figures on one image, in one run: local vs Ceph RGW.

    .venv/bin/python bench/s3.py [--size 256M] [--proxies 1,2,4] [--out bench/out/s3.json]

Starts the one-node Ceph lab (scripts/ceph-lab.sh, free loopback ports) and prints:

* full backup and restore throughput of one mixed image to a local repository and to an
  S3 repository on RGW (same image, same chunk size, the CLI as a user runs it);
* the HTTP requests that backup issued per GiB of image (counted by a pass-through
  proxy on loopback, by method; a separate run so the proxy costs no throughput);
* the aggregate throughput of 1, 2 and 4 concurrent backup processes (separate hosts'
  worth: own image, own index cache) into one bucket.

Everything runs on this machine: snapferry, its workers and the whole Ceph cluster share
the same cores, so the absolute figures are the machine's, the shape is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import imagegen  # noqa: E402
from cephlab import CephLab, free_port  # noqa: E402
from s3proxy import fault_proxy  # noqa: E402

EXE = [str(Path(sys.executable).parent / "snapferry")]


def size_arg(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(t[:-1]) << units[t[-1]] if t[-1] in units else int(t)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*EXE, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"snapferry {' '.join(args)} failed: {p.stderr.strip()}")
    return p


def timed(*args: str, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    p = cli(*args, env=env)
    return time.perf_counter() - t, p


def backup_id(p: subprocess.CompletedProcess[str]) -> str:
    return str(json.loads(p.stdout)["backup_id"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=size_arg, default=256 << 20)
    ap.add_argument("--proxies", default="1,2,4")
    ap.add_argument("--chunk-size", default="128K")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "s3.json")
    opts = ap.parse_args()
    counts = [int(x) for x in opts.proxies.split(",")]
    mib = opts.size / (1 << 20)
    work = Path(tempfile.mkdtemp(prefix="snapferry-s3bench-"))
    lab = CephLab(work / "ceph", free_port(), free_port())
    (work / "ceph").mkdir()
    lab.up()
    res: dict[str, object] = {"image_bytes": opts.size, "cpus": os.cpu_count()}
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFERRY_")}
        env = {**base, **lab.env(SNAPFERRY_CACHE_DIR=str(work / "cache")),
               # init encrypts by default: the passphrase every command here needs
               "SNAPFERRY_PASSWORD": "snapferry-bench", "SNAPFERRY_NEW_PASSWORD": "snapferry-bench"}
        images = [imagegen.make_image(work / f"img{i}.raw", opts.size, seed=100 + i)
                  for i in range(max(counts))]
        img = images[0]

        # local vs RGW, one process each, the same image
        local = work / "local-repo"
        cli("init", str(local), "--chunk-size", opts.chunk_size, env=env)
        t_lb, p = timed("backup", str(img), "--repo", str(local), "--json", env=env)
        t_lr, _ = timed("restore", "--repo", str(local), backup_id(p), "--to",
                        str(work / "out-local.raw"), env=env)
        bucket = lab.new_bucket("bench")
        url = f"s3://{bucket}/repo"
        cli("init", url, "--chunk-size", opts.chunk_size, env=env)
        t_sb, p = timed("backup", str(img), "--repo", url, "--json", env=env)
        t_sr, _ = timed("restore", "--repo", url, backup_id(p), "--to",
                        str(work / "out-s3.raw"), env=env)
        res["local"] = {"backup_MiBps": mib / t_lb, "restore_MiBps": mib / t_lr}
        res["rgw"] = {"backup_MiBps": mib / t_sb, "restore_MiBps": mib / t_sr}

        # requests per GiB: a fresh bucket, the same backup through a counting proxy
        with fault_proxy(lab.endpoint) as proxy:
            methods: Counter[str] = Counter()
            orig = proxy.rules.take

            def counting(method: str, path: str) -> tuple[str, float]:
                methods[method] += 1
                return orig(method, path)

            proxy.rules.take = counting  # type: ignore[method-assign]
            via = {**env, "SNAPFERRY_S3_ENDPOINT": proxy.endpoint,
                   "SNAPFERRY_CACHE_DIR": str(work / "cache-count")}
            b2 = f"s3://{lab.new_bucket('count')}/repo"
            cli("init", b2, "--chunk-size", opts.chunk_size, env=via)
            methods.clear()
            p = cli("backup", str(img), "--repo", b2, "--json", env=via)
            gib = opts.size / (1 << 30)
            res["requests_per_GiB_backup"] = {m: round(n / gib) for m, n in methods.items()}
            res["requests_per_GiB_backup"]["total"] = round(sum(methods.values()) / gib)
            methods.clear()
            cli("restore", "--repo", b2, backup_id(p), "--to", str(work / "out-c.raw"),
                env=via)
            res["requests_per_GiB_restore"] = {m: round(n / gib) for m, n in methods.items()}

        # N concurrent proxies into one bucket, each its own image and cache
        agg: dict[str, float] = {}
        for n in counts:
            url_n = f"s3://{lab.new_bucket(f'p{n}')}/repo"
            cli("init", url_n, "--chunk-size", opts.chunk_size, env=env)
            t = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [*EXE, "backup", str(images[i]), "--repo", url_n, "--name", f"vm{i}"],
                    env={**env, "SNAPFERRY_CACHE_DIR": str(work / f"cache-{n}-{i}")},
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
                for i in range(n)
            ]
            for pr in procs:
                _, err = pr.communicate()
                if pr.returncode != 0:
                    raise SystemExit(f"concurrent backup failed: {err.strip()}")
            dt = time.perf_counter() - t
            agg[str(n)] = n * mib / dt
        res["aggregate_backup_MiBps"] = agg
    finally:
        lab.down()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
