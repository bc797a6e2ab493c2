"""``IndexCachedBackend``: a local cache of index files in front of a remote backend.

Every backup loads the whole chunk index (every ``index`` object) before it writes;
on S3 that is one GET per index file, each time. Index files are write-once and named
by the BLAKE3 of their content (docs/FORMAT.md, *Index file*), so a copy kept on local
disk can never be stale, only damaged, and a damaged copy is caught by the same check:
a cached file is served only when ``BLAKE3(body) == trailer`` and ``trailer.hex() ==
name``; anything else is dropped and fetched again. Everything that is not a whole
``index`` load goes straight to the wrapped backend.

The cache lives in ``$SNAPFERRY_CACHE_DIR``, else ``$XDG_CACHE_HOME/snapferry``, else
``~/.cache/snapferry``, one folder per repository location (0700, files 0600). A full
listing of ``index`` through this wrapper drops cached files whose objects are gone
(pruned), so the cache does not outgrow the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from snapferry.engine.store.backend import Backend, BackendProperties, BackendSpec, ObjectInfo
from snapferry.engine.store.hashing import strong_digest

CACHE_ENV = "SNAPFERRY_CACHE_DIR"
_DIGEST = 32


def default_cache_root() -> Path:
    raw = os.environ.get(CACHE_ENV)
    if raw:
        return Path(raw)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "snapferry" if xdg else Path.home() / ".cache" / "snapferry"


def index_content_ok(name: str, blob: bytes) -> bool:
    """The index-file rule of docs/FORMAT.md: the trailer is BLAKE3 of the rest, and the
    name is the trailer in hex."""
    if len(blob) < _DIGEST:
        return False
    trailer = blob[-_DIGEST:]
    return trailer.hex() == name and strong_digest(memoryview(blob)[:-_DIGEST]) == trailer


@dataclass(frozen=True, slots=True)
class IndexCachedSpec:
    """Picklable: the wrapped backend's spec and the cache root."""

    inner: BackendSpec
    cache_root: str

    def open(self) -> IndexCachedBackend:
        return IndexCachedBackend(self.inner.open(), Path(self.cache_root))


class IndexCachedBackend:
    """``backend`` with whole-object ``index`` loads served from a verified local copy."""

    def __init__(self, backend: Backend, cache_root: Path | None = None) -> None:
        self.inner = backend
        self._root = cache_root if cache_root is not None else default_cache_root()
        tag = hashlib.sha256(backend.location.encode()).hexdigest()[:16]
        self._dir = self._root / tag / "index"
        self.hits = 0
        self.misses = 0

    # -- the Backend protocol --------------------------------------------------------
    @property
    def properties(self) -> BackendProperties:
        return self.inner.properties

    @property
    def location(self) -> str:
        return self.inner.location

    def spec(self) -> IndexCachedSpec:
        return IndexCachedSpec(self.inner.spec(), str(self._root))

    def __getstate__(self) -> dict[str, IndexCachedSpec]:
        return {"spec": self.spec()}

    def __setstate__(self, state: dict[str, IndexCachedSpec]) -> None:
        spec = state["spec"]
        self.__init__(spec.inner.open(), Path(spec.cache_root))  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"IndexCachedBackend({self.inner!r})"

    def save(
        self, kind: str, name: str, data: bytes | bytearray | memoryview, *, if_absent: bool = True
    ) -> bool:
        created = self.inner.save(kind, name, data, if_absent=if_absent)
        if created and kind == "index":
            self._store(name, bytes(data))
        return created

    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if kind != "index" or offset or length is not None:
            return self.inner.load(kind, name, offset, length)
        cached = self._fetch(name)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        data = self.inner.load(kind, name)
        if index_content_ok(name, data):
            self._store(name, data)
        return data

    def objects(self, kind: str, prefix: str = "") -> Iterator[ObjectInfo]:
        if kind != "index" or prefix:
            yield from self.inner.objects(kind, prefix)
            return
        seen: set[str] = set()
        for info in self.inner.objects(kind, prefix):
            seen.add(info.name)
            yield info
        self._evict_except(seen)

    def stat(self, kind: str, name: str) -> ObjectInfo | None:
        return self.inner.stat(kind, name)

    def remove(self, kind: str, name: str) -> None:
        self.inner.remove(kind, name)
        if kind == "index":
            self._drop(name)

    def sync(self) -> None:
        self.inner.sync()

    def leftovers(self) -> list[ObjectInfo]:
        return self.inner.leftovers()

    def remove_leftover(self, info: ObjectInfo) -> None:
        self.inner.remove_leftover(info)

    def close(self) -> None:
        self.inner.close()

    def is_empty(self) -> bool:
        """Whether the wrapped backend holds nothing (for ``init``)."""
        probe = getattr(self.inner, "is_empty", None)
        return bool(probe()) if probe is not None else not any(
            True for kind in ("config", "data", "index", "snapshots") for _ in
            self.inner.objects(kind)
        )

    # -- the cache ---------------------------------------------------------------------
    def cached_names(self) -> set[str]:
        try:
            return {n for n in os.listdir(self._dir) if not n.startswith(".")}
        except OSError:
            return set()

    def _path(self, name: str) -> Path:
        return self._dir / name

    def _fetch(self, name: str) -> bytes | None:
        try:
            data = self._path(name).read_bytes()
        except OSError:
            return None
        if index_content_ok(name, data):
            return data
        self._drop(name)  # damaged on local disk: fetch it again
        return None

    def _store(self, name: str, data: bytes) -> None:
        """Best effort: a cache that cannot be written only costs requests."""
        tmp = self._dir / f".tmp-{name[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(data)
            finally:
                os.close(fd)
            os.replace(tmp, self._path(name))
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _drop(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self._path(name).unlink()

    def _evict_except(self, live: set[str]) -> None:
        for n in self.cached_names() - live:
            self._drop(n)


if TYPE_CHECKING:  # static check that the wrapper fits the Protocol
    _check: Backend = IndexCachedBackend(IndexCachedBackend.__new__(IndexCachedBackend))
