"""Deterministic mixed disk images for tests and benchmarks.

``make_image(path, size, seed, zero_frac=..., text_frac=..., random_frac=...,
repeat_frac=..., holes=True)`` writes a raw image made of runs of 64 KiB blocks
(1..64 blocks per run), each run one of:

* zero   — with ``holes=True`` two runs in three are left as real holes (never
  written; the file is sparse) and one in three is written as explicit zeros; with
  ``holes=False`` all are written zeros;
* text   — pseudo-English words (compresses ~3x, does not deduplicate);
* random — incompressible bytes;
* repeat — one of 8 fixed random blocks repeated over the whole run (deduplicates at
  any chunk size that fits inside the run).

The same ``(size, seed, fractions)`` always gives the same bytes. The fractions are
weights (normalised); they apply to runs, so they hold on average.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

BLOCK = 64 << 10
_WORDS = (  # noqa: SIM905
    "the of and to in is was that for on with as by at from this be are or an it not "
    "which have but had they were their been has one its more also would other into "
    "there all time first than can new after some only these two may such when over "
    "disk backup snapshot block chunk guest kernel filesystem journal inode extent "
    "write read commit freeze thaw volume sector bitmap change tracking restore point "
    "server client socket export qemu vsphere virtual machine data store index digest"
).split()


def _text_pool(rng: np.random.Generator, nbytes: int) -> bytes:
    words = np.array([w.encode() + b" " for w in _WORDS], dtype=object)
    out = bytearray()
    while len(out) < nbytes:
        picks = rng.integers(0, len(words), size=4096)
        line = b"".join(words[picks].tolist())
        out += line[:-1] + b".\n"
    return bytes(out[:nbytes])


def make_image(
    path: str | os.PathLike[str],
    size: int,
    seed: int,
    *,
    zero_frac: float = 0.3,
    text_frac: float = 0.3,
    random_frac: float = 0.2,
    repeat_frac: float = 0.2,
    holes: bool = True,
) -> Path:
    """Write the image to ``path`` (replacing it) and return the path."""
    weights = np.array([zero_frac, text_frac, random_frac, repeat_frac], dtype=float)
    if weights.sum() <= 0 or (weights < 0).any():
        raise ValueError("fractions must be >= 0 and not all 0")
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    pool = _text_pool(rng, 2 << 20)
    patterns = [rng.bytes(BLOCK) for _ in range(8)]
    zeros = bytes(BLOCK)
    p = Path(path)
    nblocks = -(-size // BLOCK)
    with open(p, "wb") as f:
        f.truncate(size)
        fd = f.fileno()
        b = 0
        zero_runs = 0
        while b < nblocks:
            kind = int(rng.choice(4, p=weights))
            run = min(int(rng.integers(1, 65)), nblocks - b)
            off = b * BLOCK
            length = min(run * BLOCK, size - off)
            if kind == 0:
                zero_runs += 1
                if not holes or zero_runs % 3 == 0:
                    for o in range(0, length, BLOCK):
                        os.pwrite(fd, zeros[: min(BLOCK, length - o)], off + o)
            elif kind == 1:
                for o in range(0, length, BLOCK):
                    start = int(rng.integers(0, len(pool) - BLOCK))
                    os.pwrite(fd, pool[start : start + min(BLOCK, length - o)], off + o)
            elif kind == 2:
                os.pwrite(fd, rng.bytes(length), off)
            else:
                pat = patterns[int(rng.integers(0, len(patterns)))]
                for o in range(0, length, BLOCK):
                    os.pwrite(fd, pat[: min(BLOCK, length - o)], off + o)
            b += run
    return p


def rewrite_blocks(path: str | os.PathLike[str], frac: float, seed: int) -> list[int]:
    """Overwrite ``frac`` of the image's 64 KiB blocks (chosen at random) with random
    data; return the block numbers rewritten (sorted)."""
    size = os.path.getsize(path)
    nblocks = size // BLOCK
    rng = np.random.default_rng(seed)
    count = max(1, round(nblocks * frac))
    picks = sorted(int(x) for x in rng.choice(nblocks, size=count, replace=False))
    with open(path, "r+b") as f:
        for blk in picks:
            os.pwrite(f.fileno(), rng.bytes(BLOCK), blk * BLOCK)
    return picks


def __getattr__(name: str) -> object:
    """Names of ``bench/imagegen.py`` (``UNIT``, ``make_bench_image``, ...).

    Both files are imported as the top-level module ``imagegen`` (``tests/`` and
    ``bench/`` are each put on ``sys.path``); in one pytest session only one of them can
    own that name. ``tests/conftest.py`` imports this one first, and any other name is
    looked up in the benchmark's generator, loaded under a private module name.
    """
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib.util
    import sys

    mod = sys.modules.get("_bench_imagegen")
    if mod is None:
        bench = Path(__file__).resolve().parent.parent / "bench" / "imagegen.py"
        spec = importlib.util.spec_from_file_location("_bench_imagegen", bench)
        if spec is None or spec.loader is None or not bench.exists():
            raise AttributeError(name)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_bench_imagegen"] = mod
        spec.loader.exec_module(mod)
    try:
        return getattr(mod, name)
    except AttributeError:
        raise AttributeError(f"module 'imagegen' has no attribute {name!r}") from None
