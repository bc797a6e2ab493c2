"""``snapferry serve`` and ``snapferry files`` on an S3 repository (the Ceph RGW lab):
nbdkit's plugin opens the repository from its ``s3://`` URL with the endpoint and
credentials it inherits; what it serves reads back byte-identical to the image."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import servecli
from conftest import cli_env, run_cli, snapferry_exe
from servecli import needs_serve, pid_alive
from store_helpers import make_mixed_image

if TYPE_CHECKING:
    from cephlab import S3Env

pytest_plugins = ["cephlab"]
pytestmark = needs_serve
short_dir = servecli.short_dir


def _env(s3: S3Env, tmp_path: Path) -> dict[str, str]:
    return cli_env(**s3.env(SNAPFERRY_CACHE_DIR=str(tmp_path / "cache")))


def _backup(s3: S3Env, image: Path, env: dict[str, str]) -> str:
    p = run_cli("backup", str(image), "--repo", s3.url, "--json", env=env)
    assert p.returncode == 0, p.stderr
    return str(json.loads(p.stdout)["backup_id"])


def test_serve_and_files_on_an_s3_repository(s3_env: S3Env, tmp_path: Path,
                                             short_dir: Path) -> None:
    env = _env(s3_env, tmp_path)
    assert run_cli("init", s3_env.url, "--chunk-size", "256K", env=env).returncode == 0
    image = tmp_path / "mixed.img"
    make_mixed_image(image, 24 << 20, seed=5)
    bid = _backup(s3_env, image, env)

    # serve: nbdcopy and qemu-img read the export byte-identical to the image
    sock = short_dir / "s3.sock"
    proc = subprocess.Popen(
        [*snapferry_exe(), "serve", bid, "--repo", s3_env.url, "--socket", str(sock), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().startswith("{") or not line.strip().endswith("}"):
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"serve failed: {line}{out}{err}")
    info = json.loads(line)
    try:
        out = tmp_path / "copied.raw"
        r = subprocess.run(["nbdcopy", "--connections=4", info["uri"], str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == image.read_bytes()
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image),
                            info["uri"]], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        c = s3_env.lab.client()
        locks = c.list_objects_v2(Bucket=s3_env.bucket, Prefix="repo/locks/")
        assert locks.get("KeyCount", 0) == 1, "nbdkit holds the shared lock, in the bucket"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not pid_alive(int(info["pid"]))
    locks = s3_env.lab.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="repo/locks/")
    assert locks.get("KeyCount", 0) == 0, "the lock is gone with nbdkit"

    # files: an ext4 image backed up to the bucket; ls and get read it through nbdkit
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("s3-restore-point\n")
    fs = tmp_path / "fs.img"
    subprocess.run(["truncate", "-s", "16M", str(fs)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(fs)], check=True,
                   capture_output=True)
    fbid = _backup(s3_env, fs, env)
    p = run_cli("files", fbid, "--repo", s3_env.url, "ls", "/etc", "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert "hostname" in {e["name"] for e in json.loads(p.stdout)["entries"]}
    got = tmp_path / "hostname.out"
    p = run_cli("files", fbid, "--repo", s3_env.url, "get", "/etc/hostname", "--to", got,
                env=env)
    assert p.returncode == 0, p.stderr
    assert got.read_text() == "s3-restore-point\n"
