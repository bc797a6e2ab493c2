"""Many backup proxies, one S3 repository (Ceph RGW lab).

Four ``snapferry backup`` processes, each with its own index cache as separate hosts
would have, write into one bucket at once: two of the same image (their chunks collide:
harmless duplicates) and two of other images. Meanwhile a reader keeps listing the
manifests and parsing every one it sees: none is ever half-written. Afterwards every
restore point restores byte-identical and ``verify --read-data`` passes.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import imagegen
from conftest import cli_env, run_cli, snapferry_exe

if TYPE_CHECKING:
    from cephlab import S3Env

pytest_plugins = ["cephlab"]
IMAGE = 24 << 20


def test_four_proxies_one_bucket(s3_env: S3Env, tmp_path: Path) -> None:
    base = cli_env(**s3_env.env(SNAPFERRY_CACHE_DIR=str(tmp_path / "cache-init")))
    p = run_cli("init", s3_env.url, "--chunk-size", "256K", env=base)
    assert p.returncode == 0, p.stderr
    img_a = imagegen.make_image(tmp_path / "a.raw", IMAGE, seed=41)
    img_b = imagegen.make_image(tmp_path / "b.raw", IMAGE, seed=42)
    img_c = imagegen.make_image(tmp_path / "c.raw", IMAGE, seed=43)
    img_a2 = tmp_path / "a2.raw"
    shutil.copyfile(img_a, img_a2)
    jobs = {"vm-a": img_a, "vm-a-again": img_a2, "vm-b": img_b, "vm-c": img_c}

    torn: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()
    client = s3_env.lab.client()

    def watch() -> None:  # bounded: stops when told or after 120 s
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            got = client.list_objects_v2(Bucket=s3_env.bucket, Prefix="repo/snapshots/")
            for o in got.get("Contents", []):
                body = client.get_object(Bucket=s3_env.bucket, Key=o["Key"])["Body"].read()
                try:
                    json.loads(body)
                    seen.add(o["Key"])
                except ValueError:
                    torn.append(o["Key"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for i, (name, img) in enumerate(jobs.items()):
            env = cli_env(**s3_env.env(SNAPFERRY_CACHE_DIR=str(tmp_path / f"cache-{i}")))
            procs[name] = subprocess.Popen(
                [*snapferry_exe(), "backup", str(img), "--repo", s3_env.url, "--name", name,
                 "--json"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        results = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name}: {err}"
            results[name] = json.loads(out)["backup_id"]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stop.set()
        watcher.join(30)
    assert torn == [], f"half-written manifests seen: {torn}"
    assert len(seen) >= 1

    ls = run_cli("list", "--repo", s3_env.url, "--json", env=base)
    assert ls.returncode == 0, ls.stderr
    assert {b["backup_id"] for b in json.loads(ls.stdout)["backups"]} == set(results.values())
    for name, bid in results.items():
        out = tmp_path / f"restored-{name}.raw"
        r = run_cli("restore", "--repo", s3_env.url, bid, "--to", out, env=base)
        assert r.returncode == 0, r.stderr
        assert filecmp.cmp(out, jobs[name], shallow=False), name
        out.unlink()
    v = run_cli("verify", "--repo", s3_env.url, "--read-data", "--json", env=base)
    assert v.returncode == 0, v.stdout + v.stderr
    assert json.loads(v.stdout)["ok"]
