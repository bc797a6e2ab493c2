"""Micro benchmarks of the store's hot path (one 1 MiB chunk per call).

    .venv/bin/python -m pytest bench/test_kernels.py --benchmark-enable

In the normal test run (``--benchmark-disable`` in pyproject) each runs once, as a test.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from snapferry.engine.store import (
    Repository,
    chunk_id,
    decode_chunk,
    encode_chunk,
    is_zero,
    strong_digest,
)
from snapferry.engine.store.chunkfmt import compressor, decompressor

MiB = 1 << 20
SEED = 0x1234_5678_9ABC_DEF0


def _mixed(n: int = MiB) -> bytes:
    """Half text-like, a quarter random, a quarter zeros: a typical used disk chunk."""
    rng = random.Random(5)
    letters = b"etaoinshrdlu "
    words = [bytes(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(500)]
    text = b" ".join(rng.choice(words) for _ in range(n))[: n // 2]
    return text + rng.randbytes(n // 4) + bytes(n - len(text) - n // 4)


DATA = _mixed()
ZERO = memoryview(bytearray(MiB))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return Repository.init(tmp_path_factory.mktemp("kernels") / "repo")


def test_chunk_id(benchmark: BenchmarkFixture) -> None:
    cid = benchmark(chunk_id, SEED, memoryview(DATA))
    assert len(cid) == 16 and cid == chunk_id(SEED, DATA)


def test_strong_digest(benchmark: BenchmarkFixture) -> None:
    d = benchmark(strong_digest, memoryview(DATA))
    assert len(d) == 32


def test_is_zero(benchmark: BenchmarkFixture) -> None:
    assert benchmark(is_zero, ZERO) is True
    assert not is_zero(memoryview(DATA))


@pytest.mark.parametrize("level", [1, 3])
def test_encode_chunk(benchmark: BenchmarkFixture, level: int) -> None:
    cctx = compressor(level)
    blob = benchmark(encode_chunk, memoryview(DATA), level=level, cctx=cctx)
    assert len(blob) < len(DATA) * 0.6


def test_decode_chunk(benchmark: BenchmarkFixture) -> None:
    blob = encode_chunk(DATA, level=1)
    out = benchmark(decode_chunk, blob, dctx=decompressor())
    assert out == DATA


def _fresh_chunks(seed: int) -> Iterator[tuple[bytes, bytes]]:
    """Distinct (id, blob) pairs: the blob content is the same, the id is not (the
    store does not look inside blobs), so each put creates a new file."""
    blob = encode_chunk(DATA, level=1)
    for i in itertools.count():
        yield chunk_id(seed, i.to_bytes(8, "big")), blob


def test_store_put(benchmark: BenchmarkFixture, repo: Repository) -> None:
    chunks = _fresh_chunks(repo.seed)

    def put() -> bool:
        cid, blob = next(chunks)
        return repo.store.put(cid, blob)

    assert benchmark(put) is True
    repo.store.sync()


def test_store_has_and_header(benchmark: BenchmarkFixture, repo: Repository) -> None:
    cid = chunk_id(repo.seed, DATA)
    repo.store.put(cid, encode_chunk(DATA, level=1))

    def hit() -> bytes:
        assert repo.store.has(cid)
        return repo.store.header(cid).digest

    assert benchmark(hit) == strong_digest(DATA)


def test_store_get(benchmark: BenchmarkFixture, repo: Repository) -> None:
    cid = chunk_id(repo.seed, DATA)
    blob = encode_chunk(DATA, level=1)
    repo.store.put(cid, blob)
    assert benchmark(repo.store.get, cid) == blob
