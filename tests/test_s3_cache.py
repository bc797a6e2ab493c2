"""The local index-file cache in front of S3 (engine/store/backends/cached.py), on RGW:
a second load costs no request, a damaged cached copy is refetched, a pruned index file
leaves the cache, and only content that matches its name is ever cached."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from snapferry.engine.store.backends.cached import IndexCachedBackend, index_content_ok
from snapferry.engine.store.backends.s3 import S3Backend
from snapferry.engine.store.backends.s3open import open_s3
from snapferry.engine.store.hashing import strong_digest

if TYPE_CHECKING:
    from cephlab import S3Env

pytest_plugins = ["cephlab"]


def index_file(body: bytes) -> tuple[str, bytes]:
    d = strong_digest(body)
    return d.hex(), body + d


def _open(s3: S3Env, cache: Path) -> tuple[IndexCachedBackend, S3Backend]:
    b = open_s3(s3.url, cache_root=cache)
    assert isinstance(b, IndexCachedBackend) and isinstance(b.inner, S3Backend)
    return b, b.inner


def test_content_rule() -> None:
    name, blob = index_file(b"entries")
    assert index_content_ok(name, blob)
    assert not index_content_ok(name, blob[:-1] + b"\0")
    assert not index_content_ok("00" * 32, blob)
    assert not index_content_ok(name, b"")


def test_second_load_is_served_locally(s3_env: S3Env, tmp_path: Path) -> None:
    name, blob = index_file(os.urandom(5000))
    writer, _ = _open(s3_env, tmp_path / "writer-cache")
    assert writer.save("index", name, blob) is True
    # another host: its first load downloads, later ones (next backups) do not
    b, inner = _open(s3_env, tmp_path / "cache")
    assert b.load("index", name) == blob
    gets = inner.stats.requests["GET"]
    assert gets == 1
    for _ in range(3):
        assert b.load("index", name) == blob
    assert inner.stats.requests["GET"] == gets and b.hits == 3
    # a process reopening the spec (a worker, the next run) shares the cache
    again = b.spec().open()
    assert again.load("index", name) == blob and again.hits == 1
    # the writer cached what it saved
    assert writer.load("index", name) == blob and writer.hits == 1


def test_damaged_cached_copy_is_fetched_again(s3_env: S3Env, tmp_path: Path) -> None:
    name, blob = index_file(os.urandom(3000))
    b, inner = _open(s3_env, tmp_path / "cache")
    b.save("index", name, blob)
    (path,) = (tmp_path / "cache").glob(f"*/index/{name}")
    path.write_bytes(blob[:100])  # torn on local disk
    assert b.load("index", name) == blob
    assert inner.stats.requests["GET"] == 1 and b.misses == 1
    assert path.read_bytes() == blob


def test_pruned_index_leaves_the_cache(s3_env: S3Env, tmp_path: Path) -> None:
    names = []
    b, _ = _open(s3_env, tmp_path / "cache")
    for i in range(3):
        name, blob = index_file(bytes([i]) * 100)
        b.save("index", name, blob)
        names.append(name)
    assert b.cached_names() == set(names)
    other, _ = _open(s3_env, tmp_path / "other-cache")
    other.remove("index", names[0])  # another host prunes
    assert sorted(i.name for i in b.objects("index")) == sorted(names[1:])
    assert b.cached_names() == set(names[1:])


def test_only_matching_content_is_cached(s3_env: S3Env, tmp_path: Path) -> None:
    b, inner = _open(s3_env, tmp_path / "cache")
    name, _ = index_file(b"x")
    inner.save("index", name, b"not what the name says")
    assert b.load("index", name) == b"not what the name says"  # the repository rejects it
    assert b.cached_names() == set()
    assert b.load("index", name, 0, 3) == b"not"  # ranged loads pass through
