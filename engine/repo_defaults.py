"""A new repository's defaults, in a module of their own: the CLI shows them in ``init
--help`` without importing the store (numpy, zstd, crypto) at start-up."""

from __future__ import annotations

DEFAULT_CHUNK_SIZE = 128 << 10  # see docs/chunk-size.md
DEFAULT_ZSTD_LEVEL = 1  # see docs/chunk-size.md
