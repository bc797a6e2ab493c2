"""``snapferry`` on an S3 repository, as a user runs it, against the Ceph RGW lab:
init, backup, restore (byte-identical), list, verify, info; and each fault as one line
on stderr: the gateway stopped mid-backup, throttling past the retries, wrong
credentials, a missing bucket, a bucket that holds something else."""

from __future__ import annotations

import filecmp
import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import imagegen
from conftest import assert_one_line_error, cli_env, run_cli, snapferry_exe
from s3proxy import fault_proxy

if TYPE_CHECKING:
    from cephlab import S3Env

pytest_plugins = ["cephlab"]
IMAGE = 32 << 20


def _env(s3: S3Env, tmp_path: Path, **extra: str) -> dict[str, str]:
    return cli_env(**s3.env(SNAPFERRY_CACHE_DIR=str(tmp_path / "cache"), **extra))


def _init(s3: S3Env, env: dict[str, str]) -> None:
    p = run_cli("init", s3.url, "--chunk-size", "256K", env=env)
    assert p.returncode == 0, p.stderr


def _backup(s3: S3Env, image: Path, env: dict[str, str], name: str | None = None) -> str:
    args = ["backup", str(image), "--repo", s3.url, "--json"]
    if name:
        args += ["--name", name]
    p = run_cli(*args, env=env)
    assert p.returncode == 0, p.stderr
    return str(json.loads(p.stdout)["backup_id"])


def _restore_same(s3: S3Env, bid: str, image: Path, tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / f"r-{bid}.raw"
    r = run_cli("restore", "--repo", s3.url, bid, "--to", out, "--force", env=env)
    assert r.returncode == 0, r.stderr
    assert filecmp.cmp(out, image, shallow=False)
    out.unlink()


def _manifest_keys(s3: S3Env) -> list[str]:
    c = s3.lab.client()
    got = c.list_objects_v2(Bucket=s3.bucket, Prefix="repo/snapshots/")
    return sorted(o["Key"] for o in got.get("Contents", []))


def _data_keys(s3: S3Env) -> int:
    c = s3.lab.client()
    return int(c.list_objects_v2(Bucket=s3.bucket, Prefix="repo/data/").get("KeyCount", 0))


def test_init_backup_restore_list_verify_info(s3_env: S3Env, tmp_path: Path) -> None:
    env = _env(s3_env, tmp_path)
    env.pop("SNAPFERRY_S3_ENDPOINT")  # the option instead of the variable
    p = run_cli("init", s3_env.url, "--s3-endpoint", s3_env.lab.endpoint, "--json", env=env)
    assert p.returncode == 0, p.stderr
    env = _env(s3_env, tmp_path)
    image = imagegen.make_image(tmp_path / "disk.raw", IMAGE, seed=11)
    first = _backup(s3_env, image, env)
    imagegen.rewrite_blocks(image, 0.02, seed=12)
    second = _backup(s3_env, image, env)
    ls = run_cli("list", "--repo", s3_env.url, "--json", env=env)
    assert ls.returncode == 0, ls.stderr
    ids = {b["backup_id"] for b in json.loads(ls.stdout)["backups"]}
    assert ids == {first, second}
    _restore_same(s3_env, second, image, tmp_path, env)
    v = run_cli("verify", "--repo", s3_env.url, "--read-data", "--json", env=env)
    assert v.returncode == 0, v.stdout + v.stderr
    assert json.loads(v.stdout)["ok"]
    info = run_cli("info", "--repo", s3_env.url, "--json", env=env)
    assert info.returncode == 0, info.stderr
    assert s3_env.bucket in info.stdout
    # a second init on the same place is refused, in one line
    again = run_cli("init", s3_env.url, env=env)
    assert_one_line_error(again)


def test_gateway_stopped_mid_backup(s3_env: S3Env, tmp_path: Path) -> None:
    env = _env(s3_env, tmp_path)
    _init(s3_env, env)
    image = imagegen.make_image(tmp_path / "disk.raw", IMAGE, seed=21)
    earlier = _backup(s3_env, image, env, name="earlier")
    before = _manifest_keys(s3_env)
    packs_before = _data_keys(s3_env)
    big = imagegen.make_image(tmp_path / "big.raw", 4 * IMAGE, seed=22, zero_frac=0.0,
                              text_frac=0.0, random_frac=1.0, repeat_frac=0.0, holes=False)
    with fault_proxy(s3_env.lab.endpoint) as proxy:
        proxy.delay(10_000, 0.15)  # slow enough to be caught half-way
        slow = _env(s3_env, tmp_path, SNAPFERRY_S3_ENDPOINT=proxy.endpoint,
                    SNAPFERRY_S3_RETRIES="2")
        p = subprocess.Popen([*snapferry_exe(), "backup", str(big), "--repo", s3_env.url],
                             env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and p.poll() is None:
                if _data_keys(s3_env) > packs_before:  # a first pack of this backup landed
                    break
                time.sleep(0.02)
            assert p.poll() is None, "backup finished before the gateway could be stopped"
            s3_env.lab.stop_gateway()
            try:
                _out, err = p.communicate(timeout=120)
            finally:
                s3_env.lab.start_gateway()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapferry: "), err
    assert "S3" in lines[0] and "gave up after 3 attempts" in lines[0], err
    assert _manifest_keys(s3_env) == before  # no manifest for the failed backup
    _restore_same(s3_env, earlier, image, tmp_path, env)
    after = _backup(s3_env, image, env, name="after")
    assert after != earlier
    v = run_cli("verify", "--repo", s3_env.url, "--json", env=env)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout + v.stderr


def test_throttled_gateway(s3_env: S3Env, tmp_path: Path) -> None:
    env = _env(s3_env, tmp_path)
    _init(s3_env, env)
    image = imagegen.make_image(tmp_path / "disk.raw", IMAGE, seed=31)
    with fault_proxy(s3_env.lab.endpoint) as proxy:
        via = _env(s3_env, tmp_path, SNAPFERRY_S3_ENDPOINT=proxy.endpoint,
                   SNAPFERRY_S3_RETRIES="6")
        proxy.throttle(5)  # a few 503 SlowDown: absorbed by the retries
        bid = _backup(s3_env, image, via)
        assert proxy.rules.throttled == 5
        _restore_same(s3_env, bid, image, tmp_path, via)
        proxy.throttle(1000, 503, "SlowDown")  # more than the retries: one clear line
        before = _manifest_keys(s3_env)
        p = run_cli("backup", image, "--repo", s3_env.url, "--name", "t2",
                    env=_env(s3_env, tmp_path, SNAPFERRY_S3_ENDPOINT=proxy.endpoint,
                             SNAPFERRY_S3_RETRIES="1"))
        line = assert_one_line_error(p)
        assert "503 SlowDown" in line and "gave up after 2 attempts" in line
        proxy.throttle(0)
    assert _manifest_keys(s3_env) == before


def test_wrong_credentials_one_line(s3_env: S3Env, tmp_path: Path) -> None:
    env = _env(s3_env, tmp_path)
    _init(s3_env, env)
    p = run_cli("list", "--repo", s3_env.url,
                env=_env(s3_env, tmp_path, AWS_SECRET_ACCESS_KEY="wrong"))
    assert "refused the credentials" in assert_one_line_error(p)
    p = run_cli("list", "--repo", s3_env.url,
                env=_env(s3_env, tmp_path, AWS_ACCESS_KEY_ID="nobody"))
    assert "refused the credentials" in assert_one_line_error(p)


def test_missing_bucket_one_line(s3_env: S3Env, tmp_path: Path) -> None:
    p = run_cli("list", "--repo", "s3://no-such-bucket/repo", env=_env(s3_env, tmp_path))
    assert "bucket 'no-such-bucket' does not exist" in assert_one_line_error(p)
    p = run_cli("list", "--repo", "s3://ab/repo", env=_env(s3_env, tmp_path))
    assert "not a valid bucket name" in assert_one_line_error(p)


def test_bucket_holding_something_else(s3_env: S3Env, tmp_path: Path) -> None:
    c = s3_env.lab.client()
    c.put_object(Bucket=s3_env.bucket, Key="repo/photos/cat.jpg", Body=b"\xff\xd8")
    c.put_object(Bucket=s3_env.bucket, Key="repo/config", Body=b"[settings]\n")
    env = _env(s3_env, tmp_path)
    p = run_cli("list", "--repo", s3_env.url, env=env)
    assert "is not a snapferry repository" in assert_one_line_error(p)
    p = run_cli("init", s3_env.url, env=env)
    assert "not empty" in assert_one_line_error(p)
    assert c.get_object(Bucket=s3_env.bucket, Key="repo/config")["Body"].read() == b"[settings]\n"


def test_encrypted_repository_on_s3(s3_env: S3Env, tmp_path: Path) -> None:
    """Encryption and S3 together: init, two backups (the second goes through the local
    index-file cache, whose names are keyed digests here), restore, key list, verify with
    the passphrase and with only the verification key; no plaintext name in the bucket."""
    env = _env(s3_env, tmp_path, SNAPFERRY_ENCRYPTION="repokey",
               SNAPFERRY_PASSWORD="correct horse", SNAPFERRY_TEST_SCRYPT_N="1024")
    _init(s3_env, env)
    image = imagegen.make_image(tmp_path / "secret-disk.raw", IMAGE, seed=21)
    _backup(s3_env, image, env, name="payroll-db")
    imagegen.rewrite_blocks(image, 0.02, seed=22)
    second = _backup(s3_env, image, env, name="payroll-db")
    _restore_same(s3_env, second, image, tmp_path, env)
    keys = run_cli("key", "list", "--repo", s3_env.url, "--json", env=env)
    assert keys.returncode == 0, keys.stderr
    assert len(json.loads(keys.stdout)["keys"]) == 1
    v = run_cli("verify", "--repo", s3_env.url, "--read-data", "--json", env=env)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout + v.stderr
    vk = tmp_path / "vk.json"
    e = run_cli("key", "export", "--verification", "--to", vk, "--repo", s3_env.url, env=env)
    assert e.returncode == 0, e.stderr
    no_pw = {k: v for k, v in env.items() if k != "SNAPFERRY_PASSWORD"}
    v = run_cli("verify", "--repo", s3_env.url, "--read-data", "--verify-key-file", vk,
                "--json", env=no_pw)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout + v.stderr
    wrong = run_cli("list", "--repo", s3_env.url, env={**env, "SNAPFERRY_PASSWORD": "nope"})
    assert_one_line_error(wrong)
    c = s3_env.lab.client()
    for obj in c.list_objects_v2(Bucket=s3_env.bucket, Prefix="repo/").get("Contents", []):
        body = c.get_object(Bucket=s3_env.bucket, Key=obj["Key"])["Body"].read()
        assert b"payroll-db" not in body and b"secret-disk" not in body, obj["Key"]


def test_forget_and_prune_on_s3(s3_env: S3Env, tmp_path: Path) -> None:
    """Retention on an object store: forget the older of two points with --prune; the
    bucket shrinks, the kept point restores byte-identical, verify is clean."""
    env = _env(s3_env, tmp_path)
    _init(s3_env, env)
    image = imagegen.make_image(tmp_path / "disk.raw", IMAGE, seed=31)
    first = _backup(s3_env, image, env, name="d")
    imagegen.rewrite_blocks(image, 0.5, seed=32)  # half the data only the first point uses
    second = _backup(s3_env, image, env, name="d")

    def stored() -> int:
        c = s3_env.lab.client()
        got = c.list_objects_v2(Bucket=s3_env.bucket, Prefix="repo/data/")
        return sum(o["Size"] for o in got.get("Contents", []))

    before = stored()
    p = run_cli("forget", first, "--prune", "--repo", s3_env.url, "--json", env=env)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["prune"]["bytes_freed"] > 0
    assert stored() < before
    ls = json.loads(run_cli("list", "--repo", s3_env.url, "--json", env=env).stdout)
    assert [b["backup_id"] for b in ls["backups"]] == [second]
    _restore_same(s3_env, second, image, tmp_path, env)
    v = run_cli("verify", "--repo", s3_env.url, "--read-data", "--json", env=env)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout + v.stderr
