"""Open an ``s3://BUCKET/PREFIX`` repository location as a ``Backend``.

The one place that turns an S3 URL into the backend snapferry uses: ``S3Backend`` with
its index files cached locally (``IndexCachedBackend``). The CLI's location parsing
calls ``is_s3_url`` / ``open_s3``.
"""

from __future__ import annotations

from pathlib import Path

from snapferry.engine.errors import RepositoryError
from snapferry.engine.store.backend import Backend
from snapferry.engine.store.backends.cached import IndexCachedBackend
from snapferry.engine.store.backends.s3 import S3Backend, spec_from_url

ENDPOINT_OPTION = "--s3-endpoint"


def is_s3_url(location: str) -> bool:
    return location.startswith("s3://")


def open_s3(
    url: str,
    *,
    endpoint: str | None = None,
    create_bucket: bool = False,
    cache_root: Path | None = None,
    cache: bool = True,
) -> Backend:
    """The backend of ``url``; ``endpoint`` overrides ``SNAPFERRY_S3_ENDPOINT``;
    ``create_bucket`` (for ``init``) creates a missing bucket."""
    backend = S3Backend(spec_from_url(url, endpoint=endpoint), create_bucket=create_bucket)
    return IndexCachedBackend(backend, cache_root) if cache else backend


def new_s3(url: str, *, endpoint: str | None = None, cache_root: Path | None = None) -> Backend:
    """The backend for ``init``: the bucket is created when missing; a prefix that
    already holds anything (another repository, someone's files) is refused."""
    backend = S3Backend(spec_from_url(url, endpoint=endpoint), create_bucket=True)
    if not backend.is_empty():
        backend.close()
        raise RepositoryError(
            f"{url} is not empty; a new repository needs a bucket prefix that holds nothing"
        )
    return IndexCachedBackend(backend, cache_root)
