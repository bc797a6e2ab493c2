"""S3Backend beyond the shared contract (tests/contract/test_backend.py runs that on RGW
too): multipart only for packs, leftovers, foreign keys, URLs and specs, retries through
a misbehaving loopback proxy, and one clear error line per failure. All on the real Ceph
RADOS Gateway of tests/cephlab.py."""

from __future__ import annotations

import os
import pickle
from typing import TYPE_CHECKING

import pytest
from s3proxy import fault_proxy

from snapferry.engine.errors import RepositoryError, UsageError
from snapferry.engine.store.backends.s3 import (
    MIN_PART_SIZE,
    S3Backend,
    parse_s3_url,
    spec_from_url,
)

if TYPE_CHECKING:
    from cephlab import S3Env

pytest_plugins = ["cephlab"]  # the ceph_lab and s3_env fixtures
PACK = "ab" + "c" * 62


def _open(s3: S3Env, **kw: object) -> S3Backend:
    """Opened as the main process opens it: the bucket is probed (workers skip that)."""
    return S3Backend(spec_from_url(s3.url, **kw))  # type: ignore[arg-type]


def test_urls_and_addressing() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://my.bucket-1/a/b/") == ("my.bucket-1", "a/b")
    for bad in ("s3://ab/x", "s3://Upper/x", "s3://-bad/x", "s3://b..c/x", "file:///x",
                "s3://bucket/a//b"):
        with pytest.raises(UsageError):
            parse_s3_url(bad)
    assert spec_from_url("s3://bucket/p", endpoint="http://127.0.0.1:1").addressing_style == "path"
    env = {k: os.environ.pop(k) for k in ("SNAPFERRY_S3_ENDPOINT",) if k in os.environ}
    try:
        assert spec_from_url("s3://bucket/p").addressing_style == "virtual"
        assert spec_from_url("s3://bucket/p", addressing_style="path").endpoint is None
    finally:
        os.environ.update(env)
    with pytest.raises(UsageError):
        spec_from_url("s3://bucket/p", addressing_style="sideways")
    with pytest.raises(UsageError):
        spec_from_url("s3://bucket/p", endpoint="ftp://x")


def test_addressing_style_reaches_the_client(s3_env: S3Env) -> None:
    path = _open(s3_env)
    assert path._client.meta.config.s3["addressing_style"] == "path"
    virt = _open(s3_env, addressing_style="virtual")
    assert virt._client.meta.config.s3["addressing_style"] == "virtual"


def test_large_pack_goes_multipart_and_reads_back_across_parts(s3_env: S3Env) -> None:
    b = _open(s3_env, multipart_threshold=MIN_PART_SIZE + 1, part_size=MIN_PART_SIZE)
    data = os.urandom(2 * MIN_PART_SIZE + 12345)
    assert b.save("data", PACK, data) is True
    assert b.stats.requests["POST"] == 2  # create + complete
    assert b.stats.requests["PUT"] == 3  # one per part
    assert b.save("data", PACK, data) is False  # seen by HEAD: not uploaded again
    assert b.stats.requests["PUT"] == 3
    edge = MIN_PART_SIZE - 10
    assert b.load("data", PACK, edge, 20) == data[edge : edge + 20]
    assert b.load("data", PACK) == data
    assert b.leftovers() == []


def test_large_objects_of_other_kinds_are_one_conditional_put(s3_env: S3Env) -> None:
    b = _open(s3_env, multipart_threshold=MIN_PART_SIZE + 1, part_size=MIN_PART_SIZE)
    big = os.urandom(2 * MIN_PART_SIZE)
    assert b.save("snapshots", "p1", big) is True
    assert b.stats.requests["POST"] == 0
    assert b.save("snapshots", "p1", b"other") is False
    assert b.load("snapshots", "p1") == big


def test_unfinished_uploads_are_leftovers(s3_env: S3Env) -> None:
    b = _open(s3_env)
    c = s3_env.lab.client()
    key = f"repo/data/ab/{PACK}"
    up = c.create_multipart_upload(Bucket=s3_env.bucket, Key=key)["UploadId"]
    c.upload_part(Bucket=s3_env.bucket, Key=key, UploadId=up, PartNumber=1, Body=b"x" * 1000)
    c.create_multipart_upload(Bucket=s3_env.bucket, Key="elsewhere/data/ab/" + PACK)
    left = b.leftovers()
    assert [(i.kind, i.name, i.size) for i in left] == [("data", f"{PACK}:{up}", 1000)]
    assert b.objects("data") is not None and list(b.objects("data")) == []
    b.remove_leftover(left[0])
    assert b.leftovers() == []
    with pytest.raises(ValueError):
        b.remove_leftover(left[0].__class__("data", PACK, 0))


def test_failed_multipart_is_aborted_not_left(s3_env: S3Env) -> None:
    with fault_proxy(s3_env.lab.endpoint) as proxy:
        b = spec_from_url(s3_env.url, endpoint=proxy.endpoint, retries=1,
                          multipart_threshold=MIN_PART_SIZE + 1,
                          part_size=MIN_PART_SIZE).open()  # type: ignore[arg-type]
        proxy.fail_matching(100, "partNumber=")  # every part fails, past the retries
        with pytest.raises(RepositoryError, match="gave up after 2 attempts"):
            b.save("data", PACK, os.urandom(2 * MIN_PART_SIZE))
        proxy.fail_matching(0, "")
        assert b.stats.requests["DELETE"] == 1  # the upload was aborted
        assert b.leftovers() == []
        assert b.stat("data", PACK) is None


def test_foreign_keys_are_not_objects(s3_env: S3Env) -> None:
    b = _open(s3_env)
    c = s3_env.lab.client()
    for key in ("repo/data/README", "repo/data/zz/" + PACK, "repo/index/sub/x",
                "repo/index/.hidden", "repo/notakind/x", "repo-other/index/i1"):
        c.put_object(Bucket=s3_env.bucket, Key=key, Body=b"foreign")
    b.save("index", "i1", b"mine")
    assert [i.name for i in b.objects("index")] == ["i1"]
    assert list(b.objects("data")) == []
    assert not b.is_empty()


def test_spec_pickles_without_secrets_and_reopens(s3_env: S3Env) -> None:
    b = _open(s3_env)
    raw = pickle.dumps(b.spec())
    assert b"snapferrylabsecret" not in raw and b"snapferrylab" not in raw
    b.save("index", "i1", b"abc")
    again = pickle.loads(pickle.dumps(b))
    assert again.stats.total() == 0  # a worker's reopening costs no request
    assert again.load("index", "i1") == b"abc"
    assert again.location == s3_env.url


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (429, "TooManyRequests"),
                                             (500, "InternalError")])
def test_throttling_and_5xx_are_retried(s3_env: S3Env, status: int, code: str) -> None:
    with fault_proxy(s3_env.lab.endpoint) as proxy:
        b = spec_from_url(s3_env.url, endpoint=proxy.endpoint, retries=4).open()
        proxy.throttle(3, status, code)
        assert b.save("snapshots", "p1", b"manifest") is True
        assert proxy.rules.throttled == 3
        assert b.stats.retries == 3
        proxy.throttle(3, status, code)
        assert b.load("snapshots", "p1") == b"manifest"


def test_throttling_past_the_retries_is_one_clear_error(s3_env: S3Env) -> None:
    with fault_proxy(s3_env.lab.endpoint) as proxy:
        b = spec_from_url(s3_env.url, endpoint=proxy.endpoint, retries=2).open()
        proxy.throttle(10)
        with pytest.raises(RepositoryError) as e:
            b.save("snapshots", "p1", b"manifest")
        msg = str(e.value)
        assert "503 SlowDown" in msg and "gave up after 3 attempts" in msg and "\n" not in msg
        assert proxy.rules.throttled == 3
        proxy.throttle(0)
        assert b.stat("snapshots", "p1") is None


def test_slow_responses_time_out_and_are_retried(s3_env: S3Env) -> None:
    with fault_proxy(s3_env.lab.endpoint) as proxy:
        b = spec_from_url(s3_env.url, endpoint=proxy.endpoint, retries=3,
                          read_timeout=0.3).open()  # type: ignore[arg-type]
        b.save("index", "i1", b"abc")
        proxy.delay(2, 1.0)
        assert b.load("index", "i1") == b"abc"
        assert proxy.rules.delayed == 2
        assert b.stats.retries >= 2


def test_a_lost_answer_to_a_conditional_put_is_still_ours(s3_env: S3Env) -> None:
    with fault_proxy(s3_env.lab.endpoint) as proxy:
        b = spec_from_url(s3_env.url, endpoint=proxy.endpoint, retries=3).open()
        proxy.drop_after_forward(1, "PUT")
        # the first PUT lands but its answer is lost; the retry gets 412 and finds our bytes
        assert b.save("snapshots", "p1", b"mine") is True
        assert proxy.rules.dropped == 1
        # someone else's object under the same name is not ours
        s3_env.lab.client().put_object(Bucket=s3_env.bucket, Key="repo/snapshots/p2",
                                       Body=b"theirs")
        proxy.drop_after_forward(1, "PUT")
        assert b.save("snapshots", "p2", b"mine") is False
        assert b.load("snapshots", "p2") == b"theirs"


def test_gateway_down_then_back(s3_env: S3Env) -> None:
    b = _open(s3_env, retries=2)
    b.save("index", "i1", b"abc")
    s3_env.lab.stop_gateway()
    try:
        with pytest.raises(RepositoryError) as e:
            b.save("index", "i2", b"def")
        assert "connection failed" in str(e.value) and "gave up after 3 attempts" in str(e.value)
    finally:
        s3_env.lab.start_gateway()
    assert b.save("index", "i2", b"def") is True
    assert b.load("index", "i1") == b"abc"


def test_wrong_credentials_one_line(s3_env: S3Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(RepositoryError, match=r"refused the credentials \(SignatureDoesNotMatch"):
        _open(s3_env)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(RepositoryError, match=r"refused the credentials \(InvalidAccessKeyId"):
        _open(s3_env)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RepositoryError, match="no S3 credentials found"):
        _open(s3_env)


def test_missing_bucket_one_line(s3_env: S3Env) -> None:
    with pytest.raises(RepositoryError, match="S3 bucket 'no-such-bucket' does not exist at http"):
        S3Backend(spec_from_url("s3://no-such-bucket/repo"))
    made = S3Backend(spec_from_url("s3://made-by-init/repo"), create_bucket=True)
    assert made.is_empty()


def test_reads_in_pack_order_are_widened_scattered_ones_are_not(s3_env: S3Env) -> None:
    b = _open(s3_env)
    data = os.urandom(10 << 20)
    b.save("data", PACK, data)
    chunk = 256 << 10
    got = [b.load("data", PACK, off, chunk) for off in range(0, len(data), chunk)]
    assert b"".join(got) == data
    # 40 chunks in order: the first exact, then one 4 MiB window per 16 chunks
    assert b.stats.requests["GET"] <= 5
    before = b.stats.requests["GET"]
    other = spec_from_url(s3_env.url).open()
    for off in (7 << 20, 1 << 20, 9 << 20, 3 << 20):  # scattered: exact ranges only
        assert other.load("data", PACK, off, 1000) == data[off : off + 1000]
    assert other.stats.requests["GET"] == 4 and other.stats.bytes_down == 4000
    # a window that reaches past the pack's end serves the short tail
    assert b.load("data", PACK, len(data) - 10, 100) == data[-10:]
    assert b.load("data", PACK, len(data) + 5, 100) == b""
    assert b.stats.requests["GET"] == before
