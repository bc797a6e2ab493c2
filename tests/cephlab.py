"""A one-node Ceph cluster with a RADOS Gateway for the S3 tests (scripts/ceph-lab.sh).

``ceph_lab`` (session): the cluster in a temporary directory on free loopback ports,
stopped at the end of the session. ``s3_env`` (function): a fresh bucket and the
environment a snapferry process needs to reach it. Tests that need it are skipped only
when the Ceph binaries are absent (CI installs them with scripts/setup.sh).

Use it from a test module with ``pytest_plugins = ["cephlab"]``.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapferry.engine.store.backend import Backend

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ceph-lab.sh"
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
ACCESS_KEY = "snapferrylab"
SECRET_KEY = "snapferrylabsecret"
_bucket_seq = itertools.count()


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class CephLab:
    dir: Path
    mon_port: int
    rgw_port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Credentials and endpoint as a snapferry process gets them (the AWS chain)."""
        env = {
            "SNAPFERRY_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "default",
            # never pick up this machine's own AWS files
            "AWS_CONFIG_FILE": str(self.dir / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.dir / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        env.update(extra)
        return env

    def _script(self, action: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["SNAPFERRY_CEPH_MON_PORT"] = str(self.mon_port)
        env["SNAPFERRY_CEPH_RGW_PORT"] = str(self.rgw_port)
        return subprocess.run(
            ["bash", str(SCRIPT), action, str(self.dir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            cwd=ROOT,
        )

    def up(self) -> None:
        p = self._script("up")
        if p.returncode != 0:
            raise RuntimeError(f"ceph-lab.sh up failed: {p.stderr.strip()[-2000:]}")

    def down(self) -> None:
        self._script("down")

    def client(self):  # type: ignore[no-untyped-def]  # a boto3 client, for set-up only
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="default",
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def new_bucket(self, tag: str = "t") -> str:
        name = f"sf-{tag}-{os.getpid()}-{next(_bucket_seq)}".lower()
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Remove a bucket and all it holds (the OSD keeps everything in RAM)."""
        c = self.client()
        try:
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    c.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            for up in c.list_multipart_uploads(Bucket=name).get("Uploads", []):
                c.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
            c.delete_bucket(Bucket=name)
        except Exception:  # the gateway may be down after a fault test: best effort
            pass

    # -- the gateway alone, for fault tests ----------------------------------------------
    def _rgw_pid(self) -> int | None:
        f = self.dir / "rgw.pid"
        return int(f.read_text()) if f.exists() else None

    def stop_gateway(self) -> None:
        """Stop radosgw (SIGTERM to its recorded pid; a SIGKILLed gateway leaves its
        watches behind and the next bucket creation waits ~30 s for them); mon and osd
        keep the data."""
        pid = self._rgw_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        for _ in range(100):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        for _ in range(100):
            if not _port_open(self.rgw_port):
                return
            time.sleep(0.05)

    def start_gateway(self) -> None:
        """Start radosgw again in its own session; its pid replaces the old one."""
        log = open(self.dir / "rgw.log", "ab")  # noqa: SIM115  # handed to the daemon
        proc = subprocess.Popen(
            ["radosgw", "--conf", str(self.dir / "ceph.conf"), "-n", "client.rgw.a", "-f"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        (self.dir / "rgw.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _port_open(self.rgw_port):
                return
            if proc.poll() is not None:
                raise RuntimeError("radosgw exited while restarting")
            time.sleep(0.05)
        raise RuntimeError("radosgw did not answer again in 30 s")


_shared: CephLab | None = None


def shared_lab() -> CephLab:
    """The one cluster of this test process: started on first use, stopped at exit
    (also by the ``ceph_lab`` fixture's session teardown). Skips when Ceph is absent."""
    global _shared
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Ceph is not installed ({', '.join(missing)} missing; scripts/setup.sh)")
    pytest.importorskip("boto3", reason="boto3 is not installed (pip install '.[s3]')")
    if _shared is None:
        lab = CephLab(Path(tempfile.mkdtemp(prefix="snapferry-ceph-")), free_port(), free_port())
        lab.up()
        _shared = lab
        atexit.register(_stop_shared)
    return _shared


def _stop_shared() -> None:
    global _shared
    lab, _shared = _shared, None
    if lab is not None:
        lab.down()
        shutil.rmtree(lab.dir, ignore_errors=True)


def contract_backend(tmp_path: Path, *, cached: bool = False) -> Backend:
    """A fresh, empty S3 backend on the lab, for tests/contract/test_backend.py. The
    process environment gets the lab's credentials so that spawned workers reopening the
    spec find them through the AWS chain, as a real proxy's workers would."""
    from snapferry.engine.store.backends.s3 import spec_from_url

    lab = shared_lab()
    os.environ.update(lab.env())
    bucket = lab.new_bucket("c")
    backend = spec_from_url(f"s3://{bucket}/repo").open()
    if cached:
        from snapferry.engine.store.backends.cached import IndexCachedBackend

        return IndexCachedBackend(backend, tmp_path / "cache")
    return backend


@pytest.fixture(scope="session")
def ceph_lab() -> Iterator[CephLab]:
    lab = shared_lab()
    try:
        yield lab
    finally:
        _stop_shared()


@dataclass
class S3Env:
    lab: CephLab
    bucket: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/repo"

    def env(self, **extra: str) -> dict[str, str]:
        return self.lab.env(**extra)


@pytest.fixture
def s3_env(ceph_lab: CephLab, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Env]:
    """A fresh bucket, removed afterwards; this process's environment set to reach it."""
    for k, v in ceph_lab.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "SNAPFERRY_S3_ADDRESSING"):
        monkeypatch.delenv(k, raising=False)
    env = S3Env(ceph_lab, ceph_lab.new_bucket())
    yield env
    ceph_lab.drop_bucket(env.bucket)
