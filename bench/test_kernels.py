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

from snapferry.engine.store import Repository, chunk_id, is_zero, strong_digest
from snapferry.engine.store.blobs import compressor, decode, encode

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
def test_encode_blob(benchmark: BenchmarkFixture, level: int) -> None:
    cctx = compressor(level)
    _codec, stored = benchmark(encode, memoryview(DATA), level=level, cctx=cctx)
    assert len(stored) < len(DATA) * 0.6


def test_decode_blob(benchmark: BenchmarkFixture) -> None:
    codec, stored = encode(DATA, level=1)
    out = benchmark(decode, codec, stored, len(DATA))
    assert bytes(out) == DATA


def _fresh_chunks() -> Iterator[tuple[bytes, bytes]]:
    """Distinct ids with the same content (the writer does not look inside for dedup
    beyond the id and digest), so each store appends a new blob to the pack."""
    for i in itertools.count():
        yield chunk_id(SEED, i.to_bytes(8, "big")), DATA


def test_writer_store_new(benchmark: BenchmarkFixture, repo: Repository) -> None:
    w = repo.writer_spec().open()
    chunks = _fresh_chunks()
    digest = strong_digest(DATA)

    def store() -> bool:
        cid, data = next(chunks)
        return w.store(cid, data, digest).new

    assert benchmark(store) is True
    w.flush()


def test_writer_dedup_hit_and_read(benchmark: BenchmarkFixture, repo: Repository) -> None:
    w = repo.writer_spec().open()
    cid = chunk_id(repo.seed, DATA)
    w.store(cid, DATA, strong_digest(DATA))
    w.flush()
    w2 = repo.writer_spec().open()
    assert benchmark(lambda: w2.store(cid, DATA, strong_digest(DATA)).new) is False
    reader = repo.reader()
    assert bytes(reader.read(cid)) == DATA
