"""``S3Backend``: repository objects in one bucket of an S3 service (Ceph RGW, MinIO, AWS).

Keys mirror the local layout (docs/FORMAT.md) under an optional prefix, so a repository
copied between a directory and a bucket object by object stays valid::

    PREFIX/config                 kind "config", name "config"
    PREFIX/data/<ab>/<name>       kind "data" (packs), fanned out by the name's first 2 chars
    PREFIX/<kind>/<name>          every other kind

How each rule of the ``Backend`` seam is kept on S3:

* create-if-absent is one ``PUT`` with ``If-None-Match: *`` (412 -> False). The service
  must honour it (Ceph RGW, MinIO and AWS S3 do); a retried PUT whose first attempt may
  have landed compares the stored ETag with the MD5 of its own bytes, so a lost response
  is not mistaken for someone else's object.
* multipart uploads only for kind ``data`` objects over ``multipart_threshold``:
  services ignore ``If-None-Match`` on CompleteMultipartUpload, and packs are the one
  kind whose names never collide (unique names), so a second writer of the same name
  is impossible, not merely unlikely to win. Every other kind is one PUT, whatever its
  size (a single PUT goes up to 5 GiB).
* every request holds one slot of a pool of ``max_connections``; throttling (429, 503
  SlowDown), 5xx and connection errors are retried with capped exponential backoff and
  full jitter, ``retries`` times, then reported as one ``RepositoryError`` line.
* ranged GETs for chunks inside packs; reads that walk a pack in order (restore,
  verify) are widened to ``read_window`` (4 MiB) and served from a small per-process
  LRU of windows, so a restore costs about one GET per 4 MiB, not one per chunk.
* ``leftovers`` are the unfinished multipart uploads under the prefix.
* credentials come from the standard AWS chain (environment, shared config and
  credentials files, ``AWS_PROFILE``, instance roles); none is stored in the spec.

boto3 is used because it is the reference client, is kept current with every S3
feature this needs (conditional PUT, ranged GET, multipart, SigV4, the whole credential
chain) and is thread-safe per client; on loopback RGW the service, not the client, is
the limit (see docs in the README's *S3 repositories* section).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from snapferry.engine.errors import RepositoryError, UsageError
from snapferry.engine.store.backend import (
    KINDS,
    Backend,
    BackendProperties,
    ObjectInfo,
    ObjectMissing,
    check_name,
)

ENDPOINT_ENV = "SNAPFERRY_S3_ENDPOINT"
ADDRESSING_ENV = "SNAPFERRY_S3_ADDRESSING"
CONNECTIONS_ENV = "SNAPFERRY_S3_CONNECTIONS"
RETRIES_ENV = "SNAPFERRY_S3_RETRIES"
DEFAULT_CONNECTIONS = 16
DEFAULT_RETRIES = 8
DEFAULT_MULTIPART_THRESHOLD = 64 << 20
DEFAULT_PART_SIZE = 16 << 20
DEFAULT_READ_WINDOW = 4 << 20
MIN_PART_SIZE = 5 << 20  # the S3 minimum for every part but the last
_FANOUT_KINDS = ("data",)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
        "BadDigest",
        "OperationAborted",
    }
)
_CRED_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)
_T = TypeVar("_T")


class _ClientError(Protocol):
    response: dict[str, dict[str, object]]


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> (bucket, prefix without surrounding slashes)."""
    if not url.startswith("s3://"):
        raise UsageError(f"not an S3 repository URL (s3://BUCKET/PREFIX): {url!r}")
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise UsageError(
            f"invalid S3 bucket name {bucket!r} in {url!r} (3-63 characters: lower-case "
            "letters, digits, '.' and '-')"
        )
    prefix = prefix.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise UsageError(f"invalid S3 prefix {prefix!r} in {url!r}")
    return bucket, prefix


@dataclass(frozen=True, slots=True)
class S3BackendSpec:
    """Picklable: reopens the same bucket and prefix in a worker process. Holds no
    secret: each process resolves credentials through the AWS chain itself."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str | None = None
    max_connections: int = DEFAULT_CONNECTIONS
    retries: int = DEFAULT_RETRIES
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    part_size: int = DEFAULT_PART_SIZE
    read_window: int = DEFAULT_READ_WINDOW
    read_windows: int = 8  # windows kept per process (8 x 4 MiB)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def open(self) -> S3Backend:
        # A worker reopening a backend its parent already checked: no probe request.
        return S3Backend(self, check=False)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def spec_from_url(
    url: str,
    *,
    endpoint: str | None = None,
    profile: str | None = None,
    region: str | None = None,
    addressing_style: str | None = None,
    max_connections: int | None = None,
    retries: int | None = None,
    **extra: int,
) -> S3BackendSpec:
    """The spec of ``s3://BUCKET/PREFIX``; unset options come from the environment
    (``SNAPFERRY_S3_ENDPOINT``, ``SNAPFERRY_S3_ADDRESSING``, ``SNAPFERRY_S3_CONNECTIONS``,
    ``SNAPFERRY_S3_RETRIES``; region and profile from the AWS variables)."""
    bucket, prefix = parse_s3_url(url)
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
    style = addressing_style or os.environ.get(ADDRESSING_ENV) or None
    if style is None:
        style = "path" if endpoint else "virtual"
    if style not in ("path", "virtual"):
        raise UsageError(f"S3 addressing style must be 'path' or 'virtual', not {style!r}")
    if endpoint and not re.match(r"https?://[^/\s]+/?$", endpoint):
        raise UsageError(f"invalid S3 endpoint {endpoint!r} (http[s]://HOST[:PORT])")
    conns = max_connections or _env_int(CONNECTIONS_ENV, DEFAULT_CONNECTIONS, 1, 256)
    tries = retries if retries is not None else _env_int(RETRIES_ENV, DEFAULT_RETRIES, 0, 50)
    return S3BackendSpec(
        bucket=bucket,
        prefix=prefix,
        endpoint=endpoint.rstrip("/") if endpoint else None,
        region=region,
        profile=profile,
        addressing_style=style,
        max_connections=conns,
        retries=tries,
        **extra,
    )


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, not {raw!r}") from None
    if not lo <= v <= hi:
        raise UsageError(f"{name} must be between {lo} and {hi}, not {v}")
    return v


@dataclass
class RequestStats:
    """Requests issued by one backend, by operation, and how many were retries."""

    requests: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def total(self) -> int:
        return sum(self.requests.values())


class _Transient(Exception):
    """A failure worth another attempt (throttled, 5xx, connection lost)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class S3Backend:
    """Objects in ``s3://bucket/prefix`` (see the module doc). Thread-safe."""

    def __init__(
        self, spec: S3BackendSpec, *, create_bucket: bool = False, check: bool = True
    ) -> None:
        try:
            import boto3
            import botocore.config
        except ImportError:
            raise RepositoryError(
                "S3 repositories need boto3: pip install 'snapferry[s3]'"
            ) from None
        if spec.part_size < MIN_PART_SIZE:
            raise UsageError(f"S3 part size must be at least {MIN_PART_SIZE} bytes")
        self._spec = spec
        self.stats = RequestStats()
        self._stats_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(spec.max_connections)
        self._parts_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._base = f"{spec.prefix}/" if spec.prefix else ""
        self._window_lock = threading.Lock()
        self._windows: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._last_end: OrderedDict[str, int] = OrderedDict()
        cfg = botocore.config.Config(
            max_pool_connections=spec.max_connections + 2,
            retries={"total_max_attempts": 1, "mode": "standard"},  # our own loop retries
            connect_timeout=spec.connect_timeout,
            read_timeout=spec.read_timeout,
            s3={"addressing_style": spec.addressing_style or "auto"},
            # Checksums only when an operation requires one: several S3-compatible
            # services reject the newer default (streamed trailing CRC32). Each PUT's
            # body is still covered: SigV4 signs its SHA-256 (botocore does so whenever
            # no Content-MD5 is sent) and the service checks it.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="snapferry",
        )
        try:
            session = boto3.session.Session(profile_name=spec.profile)
        except Exception as e:  # botocore.exceptions.ProfileNotFound and kin
            raise RepositoryError(f"S3 credentials: {_one_line(e)}") from None
        region = spec.region or session.region_name or ("us-east-1" if spec.endpoint else None)
        self._client = session.client(
            "s3", endpoint_url=spec.endpoint, region_name=region, config=cfg
        )
        if check or create_bucket:
            self._check_bucket(create_bucket)

    # -- the Backend protocol --------------------------------------------------------
    @property
    def properties(self) -> BackendProperties:
        return BackendProperties(
            max_connections=self._spec.max_connections,
            atomic_create_if_absent=True,
            needs_sync=False,
            durable_save=True,
        )

    @property
    def location(self) -> str:
        return self._spec.url

    def spec(self) -> S3BackendSpec:
        return self._spec

    def __getstate__(self) -> dict[str, S3BackendSpec]:
        return {"spec": self._spec}

    def __setstate__(self, state: dict[str, S3BackendSpec]) -> None:
        self.__init__(state["spec"], check=False)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"S3Backend({self._spec.url!r}, endpoint={self._spec.endpoint!r})"

    def save(
        self, kind: str, name: str, data: bytes | bytearray | memoryview, *, if_absent: bool = True
    ) -> bool:
        check_name(kind, name)
        key = self._key(kind, name)
        body = data if isinstance(data, bytes) else bytes(data)
        if kind == "data" and len(body) > self._spec.multipart_threshold:
            if if_absent and self.stat(kind, name) is not None:
                return False
            self._multipart(key, body)
            return True
        # No Content-MD5: SigV4 already signs the body's SHA-256 and the service checks
        # it; a second digest would cost CPU (MD5 runs ~4x slower than the PUT here).
        args: dict[str, object] = {
            "Bucket": self._spec.bucket,
            "Key": key,
            "Body": body,
            "ContentLength": len(body),
        }
        if if_absent:
            args["IfNoneMatch"] = "*"
        attempts = [0]

        def put() -> bool:
            attempts[0] += 1
            try:
                self._client.put_object(**args)
            except Exception as e:
                if _status(e) == 412 or _code(e) == "PreconditionFailed":
                    if attempts[0] > 1:
                        # An earlier attempt may have landed and lost its answer: the
                        # object is ours when it holds exactly our bytes.
                        md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
                        return self._etag(key) == md5
                    return False
                raise
            self._count_bytes(up=len(body))
            return True

        return self._call("PUT", f"writing {kind}/{name}", put)

    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(kind, name)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            if self.stat(kind, name) is None:
                raise ObjectMissing(f"{kind}/{name} is missing from the repository")
            return b""
        if kind == "data" and length is not None and length < self._spec.read_window:
            return self._load_sequential(name, offset, length)
        return self._get(kind, name, offset, length)

    def _load_sequential(self, name: str, offset: int, length: int) -> bytes:
        """Chunks of a pack read in order (a restore, a verify) cost one GET per
        ``read_window`` bytes instead of one per chunk: a read that starts where the
        previous read of the same pack ended fetches a whole window, and the next reads
        are served from it. Other reads (scattered dedup hits) stay exact ranges."""
        w = self._spec.read_window
        with self._window_lock:
            for (pack, start), buf in self._windows.items():
                if pack == name and start <= offset and (
                    offset + length <= start + len(buf) or len(buf) < w
                ):
                    self._windows.move_to_end((pack, start))
                    self._last_end[name] = offset + length
                    return buf[offset - start : offset - start + length]
            sequential = self._last_end.get(name) == offset
            self._last_end[name] = offset + length
            self._last_end.move_to_end(name)
            while len(self._last_end) > 1024:
                self._last_end.popitem(last=False)
        if not sequential:
            return self._get("data", name, offset, length)
        buf = self._get("data", name, offset, w)
        with self._window_lock:
            self._windows[(name, offset)] = buf
            while len(self._windows) > self._spec.read_windows:
                self._windows.popitem(last=False)
        return buf[:length]

    def _get(self, kind: str, name: str, offset: int, length: int | None) -> bytes:
        key = self._key(kind, name)
        args: dict[str, object] = {"Bucket": self._spec.bucket, "Key": key}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"

        def get() -> bytes:
            try:
                resp = self._client.get_object(**args)
            except Exception as e:
                if _status(e) == 416 or _code(e) == "InvalidRange":
                    return b""  # the object exists and ends before offset
                if _missing(e):
                    raise ObjectMissing(f"{kind}/{name} is missing from the repository") from None
                raise
            want = resp.get("ContentLength")
            body: bytes = resp["Body"].read()
            if isinstance(want, int) and len(body) != want:
                raise _Transient(f"short read ({len(body)} of {want} bytes)")
            self._count_bytes(down=len(body))
            return body

        return self._call("GET", f"reading {kind}/{name}", get)

    def objects(self, kind: str, prefix: str = "") -> Iterator[ObjectInfo]:
        if kind not in KINDS:
            raise ValueError(f"unknown object kind {kind!r}")
        if kind == "config":
            info = self.stat("config", "config")
            if info is not None and info.name.startswith(prefix):
                yield info
            return
        if kind in _FANOUT_KINDS:
            base = f"{self._base}{kind}/"
            key_prefix = f"{base}{prefix[:2]}/{prefix}" if len(prefix) >= 2 else base
        else:
            base = key_prefix = f"{self._base}{kind}/"
            key_prefix += prefix
        for key, size in self._list_keys(key_prefix, f"listing {kind}"):
            rest = key[len(base) :]
            if kind in _FANOUT_KINDS:
                sub, _, rest = rest.partition("/")
                if sub != rest[:2] or "/" in rest:
                    continue
            if "/" in rest or not _NAME_RE.fullmatch(rest) or not rest.startswith(prefix):
                continue  # a key planted by someone else: not an object of ours
            yield ObjectInfo(kind, rest, size)

    def stat(self, kind: str, name: str) -> ObjectInfo | None:
        check_name(kind, name)
        key = self._key(kind, name)

        def head() -> ObjectInfo | None:
            try:
                resp = self._client.head_object(Bucket=self._spec.bucket, Key=key)
            except Exception as e:
                if _missing(e):
                    return None
                raise
            return ObjectInfo(kind, name, int(resp["ContentLength"]))

        return self._call("HEAD", f"reading {kind}/{name}", head)

    def remove(self, kind: str, name: str) -> None:
        check_name(kind, name)
        key = self._key(kind, name)

        def delete() -> None:
            try:
                self._client.delete_object(Bucket=self._spec.bucket, Key=key)
            except Exception as e:
                if not _missing(e):
                    raise

        self._call("DELETE", f"removing {kind}/{name}", delete)

    def sync(self) -> None:
        """Nothing to do: a PUT is durable when the service answers it."""

    def leftovers(self) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for key, upload_id in self._list_uploads():
            parsed = self._parse_key(key)
            if parsed is None:
                continue
            kind, name = parsed
            size = self._uploaded_bytes(key, upload_id)
            out.append(ObjectInfo(kind, f"{name}:{upload_id}", size))
        return out

    def remove_leftover(self, info: ObjectInfo) -> None:
        name, sep, upload_id = info.name.partition(":")
        if not sep or not upload_id:
            raise ValueError(f"not a leftover: {info.name!r}")
        check_name(info.kind, name)
        self._abort(self._key(info.kind, name), upload_id)

    def close(self) -> None:
        with self._pool_lock:
            pool, self._parts_pool = self._parts_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        client_close = getattr(self._client, "close", None)
        if client_close is not None:
            client_close()

    # -- extras for this backend only ---------------------------------------------------
    def is_empty(self) -> bool:
        """True when nothing at all lives under the prefix (a fresh place for ``init``)."""
        prefix = self._base

        def probe() -> bool:
            resp = self._client.list_objects_v2(
                Bucket=self._spec.bucket, Prefix=prefix, MaxKeys=1
            )
            return not resp.get("Contents")

        return self._call("LIST", "listing the repository", probe)

    # -- keys ---------------------------------------------------------------------------
    def _key(self, kind: str, name: str) -> str:
        if kind == "config":
            if name != "config":
                raise ValueError("the config object is named 'config'")
            return f"{self._base}config"
        if kind in _FANOUT_KINDS:
            return f"{self._base}{kind}/{name[:2]}/{name}"
        return f"{self._base}{kind}/{name}"

    def _parse_key(self, key: str) -> tuple[str, str] | None:
        if not key.startswith(self._base):
            return None
        parts = key[len(self._base) :].split("/")
        if parts == ["config"]:
            return "config", "config"
        if len(parts) == 3 and parts[0] in _FANOUT_KINDS and parts[2][:2] == parts[1]:
            kind, name = parts[0], parts[2]
        elif len(parts) == 2 and parts[0] in KINDS:
            kind, name = parts
        else:
            return None
        return (kind, name) if _NAME_RE.fullmatch(name) else None

    # -- requests -----------------------------------------------------------------------
    def _call(self, op: str, what: str, fn: Callable[[], _T]) -> _T:
        """Run one request in a pool slot; retry transient failures with backoff."""
        spec = self._spec
        attempt = 0
        while True:
            with self._stats_lock:
                self.stats.requests[op] += 1
                if attempt:
                    self.stats.retries += 1
            try:
                with self._slots:
                    return fn()
            except (ObjectMissing, RepositoryError, ValueError):
                raise
            except Exception as e:
                why = _transient(e)
                if why is None:
                    raise self._fatal(what, e) from None
                if attempt >= spec.retries:
                    raise RepositoryError(
                        f"S3 {self._where()} failed while {what}: {why} "
                        f"(gave up after {attempt + 1} attempts)"
                    ) from None
            attempt += 1
            time.sleep(random.uniform(0, min(5.0, 0.05 * (2**attempt))))

    def _fatal(self, what: str, e: Exception) -> RepositoryError:
        code, status = _code(e), _status(e)
        bucket = self._spec.bucket
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return RepositoryError(
                "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or ~/.aws/credentials"
            )
        if code in _CRED_CODES:
            return RepositoryError(
                f"S3 {self._where()} refused the credentials ({code}) while {what}: check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile"
            )
        if code == "NoSuchBucket" or (status == 404 and what == "opening the bucket"):
            return RepositoryError(f"S3 bucket {bucket!r} does not exist at {self._where()}")
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return RepositoryError(
                f"S3 {self._where()} denied access to bucket {bucket!r} while {what}"
            )
        if type(e).__name__ == "ParamValidationError":
            return RepositoryError(f"S3 request rejected while {what}: {_one_line(e)}")
        detail = code or type(e).__name__
        return RepositoryError(f"S3 {self._where()} error while {what}: {detail}: {_one_line(e)}")

    def _where(self) -> str:
        return self._spec.endpoint or "service"

    def _count_bytes(self, *, up: int = 0, down: int = 0) -> None:
        with self._stats_lock:
            self.stats.bytes_up += up
            self.stats.bytes_down += down

    def _check_bucket(self, create: bool) -> None:
        bucket = self._spec.bucket

        def head() -> bool:
            # A one-key listing rather than HEAD: its error body names the cause
            # (NoSuchBucket, InvalidAccessKeyId, SignatureDoesNotMatch), HEAD's has none.
            try:
                self._client.list_objects_v2(Bucket=bucket, Prefix=self._base, MaxKeys=1)
            except Exception as e:
                if _code(e) == "NoSuchBucket":
                    return False
                raise
            return True

        if self._call("LIST", "opening the bucket", head):
            return
        if not create:
            raise RepositoryError(f"S3 bucket {bucket!r} does not exist at {self._where()}")

        def make() -> None:
            try:
                self._client.create_bucket(Bucket=bucket)
            except Exception as e:
                if _code(e) not in ("BucketAlreadyOwnedByYou",):
                    raise

        self._call("PUT", f"creating bucket {bucket!r}", make)

    def _etag(self, key: str) -> str | None:
        try:
            resp = self._client.head_object(Bucket=self._spec.bucket, Key=key)
        except Exception:
            return None
        return str(resp.get("ETag", "")).strip('"') or None

    def _list_keys(self, prefix: str, what: str) -> Iterator[tuple[str, int]]:
        token: str | None = None
        while True:
            args: dict[str, object] = {"Bucket": self._spec.bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token

            def page(a: dict[str, object] = args) -> dict[str, object]:
                return self._client.list_objects_v2(**a)

            resp = self._call("LIST", what, page)
            for item in resp.get("Contents") or []:  # type: ignore[attr-defined]
                yield str(item["Key"]), int(item["Size"])
            if not resp.get("IsTruncated"):
                return
            token = str(resp["NextContinuationToken"])

    def _list_uploads(self) -> Iterator[tuple[str, str]]:
        key_marker: str | None = None
        id_marker: str | None = None
        while True:
            args: dict[str, object] = {"Bucket": self._spec.bucket, "Prefix": self._base}
            if key_marker:
                args["KeyMarker"] = key_marker
            if id_marker:
                args["UploadIdMarker"] = id_marker

            def page(a: dict[str, object] = args) -> dict[str, object]:
                return self._client.list_multipart_uploads(**a)

            resp = self._call("LIST", "listing unfinished uploads", page)
            for up in resp.get("Uploads") or []:  # type: ignore[attr-defined]
                yield str(up["Key"]), str(up["UploadId"])
            if not resp.get("IsTruncated"):
                return
            key_marker = str(resp.get("NextKeyMarker") or "")
            id_marker = str(resp.get("NextUploadIdMarker") or "")
            if not key_marker and not id_marker:
                return

    def _uploaded_bytes(self, key: str, upload_id: str) -> int:
        def parts() -> int:
            try:
                resp = self._client.list_parts(
                    Bucket=self._spec.bucket, Key=key, UploadId=upload_id
                )
            except Exception as e:
                if _code(e) == "NoSuchUpload":
                    return 0
                raise
            return sum(int(p["Size"]) for p in resp.get("Parts") or [])

        return self._call("LIST", "listing unfinished uploads", parts)

    def _abort(self, key: str, upload_id: str) -> None:
        def abort() -> None:
            try:
                self._client.abort_multipart_upload(
                    Bucket=self._spec.bucket, Key=key, UploadId=upload_id
                )
            except Exception as e:
                if _code(e) != "NoSuchUpload":
                    raise

        self._call("DELETE", "removing an unfinished upload", abort)

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._parts_pool is None:
                self._parts_pool = ThreadPoolExecutor(
                    max_workers=max(2, min(8, self._spec.max_connections)),
                    thread_name_prefix="s3-part",
                )
            return self._parts_pool

    def _multipart(self, key: str, body: bytes) -> None:
        """Upload ``body`` in parts in parallel; abort the upload on any failure."""
        bucket = self._spec.bucket
        what = f"writing {key}"

        def create() -> str:
            resp = self._client.create_multipart_upload(Bucket=bucket, Key=key)
            return str(resp["UploadId"])

        upload_id = self._call("POST", what, create)
        size = self._spec.part_size
        ranges = [(i // size + 1, i, min(i + size, len(body))) for i in range(0, len(body), size)]
        mv = memoryview(body)

        def one(part: tuple[int, int, int]) -> dict[str, object]:
            number, start, end = part
            chunk = bytes(mv[start:end])

            def put() -> dict[str, object]:
                resp = self._client.upload_part(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    ContentLength=len(chunk),
                )
                self._count_bytes(up=len(chunk))
                return {"PartNumber": number, "ETag": resp["ETag"]}

            return self._call("PUT", f"{what} (part {number})", put)

        try:
            done = list(self._pool().map(one, ranges))

            def complete() -> None:
                self._client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": done},
                )

            self._call("POST", what, complete)
        except BaseException:
            try:
                self._abort(key, upload_id)
            except RepositoryError:
                pass  # left for ``leftovers``
            raise


def _code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error")
        if isinstance(err, dict):
            return str(err.get("Code") or "")
    return ""


def _status(e: BaseException) -> int:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        meta = resp.get("ResponseMetadata")
        if isinstance(meta, dict):
            try:
                return int(meta.get("HTTPStatusCode") or 0)
            except (TypeError, ValueError):
                return 0
    return 0


def _missing(e: BaseException) -> bool:
    return _code(e) in ("NoSuchKey", "404", "NotFound") or (
        _status(e) == 404 and _code(e) != "NoSuchBucket"
    )


def _transient(e: BaseException) -> str | None:
    """Why ``e`` is worth retrying, or None when it is final."""
    if isinstance(e, _Transient):
        return e.why
    name = type(e).__name__
    if name in (
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ProxyConnectionError",
        "HTTPClientError",
    ) or isinstance(e, ConnectionError | TimeoutError):
        return f"connection failed ({_one_line(e)})"
    code, status = _code(e), _status(e)
    if code in _RETRY_CODES or status == 429 or status >= 500:
        return f"{status or ''} {code or 'server error'}".strip()
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if TYPE_CHECKING:  # static check that S3Backend fits the Protocol
    _check: Backend = S3Backend(S3BackendSpec("bucket"))
