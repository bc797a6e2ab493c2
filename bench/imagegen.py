"""Deterministic benchmark disk images: a sparse raw file with a realistic content mix.

Why not ``tests/imagegen.py``: the benchmark needs an extra content class (compressible
binary records, like database pages or logs in a binary format), 1 MiB-aligned
repeated regions (so fixed-size chunk dedup can find them, as it would for copied
files on a fresh filesystem) and numpy-speed generation at multi-GiB sizes.

The disk is laid out as a walk of extents whose lengths are multiples of 64 KiB
(log-uniform between 64 KiB and 16 MiB). Each extent is one of:

* ``hole``   — never written: a hole in the sparse raw file (unallocated in qcow2);
* ``zero``   — zeros written explicitly (freed blocks a guest zeroed; allocated in raw);
* ``text``   — Zipf-distributed words from a fixed vocabulary, in lines (logs, sources);
* ``binary`` — 64-byte structured records (ids, timestamps, small counters, floats,
  tags): compressible binary data;
* ``random`` — incompressible bytes (compressed or encrypted files);
* ``repeat`` — a copy of earlier data at the same 1 MiB alignment (duplicate files).

Everything derives from one seed: the same arguments give the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

UNIT = 64 * 1024
MIB = 1024 * 1024
MAX_EXTENT = 16 * MIB

DEFAULT_MIX: dict[str, float] = {
    "hole": 0.35,
    "zero": 0.05,
    "text": 0.22,
    "binary": 0.15,
    "random": 0.13,
    "repeat": 0.10,
}

_WORD_TEXT = (
    "the of and to in is was for on that with as by at from this be or are an it "
    "not have which has but were had their its been one all also more can new when "
    "there first after other would two some into who time only over most may these "
    "kernel block device error warning info debug request response user session "
    "file path config value return static int void char struct const unsigned long "
    "if else while break continue switch case default include define ifdef endif "
    "http GET POST 200 404 500 Mozilla Linux x86_64 systemd cron sshd nginx postgres "
    "SELECT FROM WHERE INSERT UPDATE INTO VALUES ORDER GROUP BY LIMIT JOIN ON AND"
)
_WORDS = _WORD_TEXT.split()


@dataclass
class ImageStats:
    """What was written: bytes per content class and the exact extent layout."""

    size: int
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    extents: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def allocated(self) -> int:
        return self.size - self.bytes_by_kind.get("hole", 0)


class ContentGenerator:
    """Produces bytes of one content class; deterministic for a given numpy Generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
        extra = ["".join(syllables[i] for i in rng.integers(0, len(syllables),
                                                           rng.integers(1, 5)))
                 for _ in range(1500)]
        words = [w.encode() for w in _WORDS + extra]
        # Zipf-like weights over the vocabulary, common words first.
        weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
        self._word_p = weights / weights.sum()
        seps = [b" "] * len(words)
        pool = b"".join(w + s for w, s in zip(words, seps, strict=True))
        self._pool = np.frombuffer(pool, dtype=np.uint8)
        lens = np.array([len(w) + 1 for w in words], dtype=np.int64)
        self._starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        self._lens = lens
        self._record_tags = rng.integers(0, 2**32, 32, dtype=np.uint64)
        self._lines: list[bytes] | None = None
        self._lines_avg = 80.0

    def make(self, kind: str, n: int) -> bytes:
        if kind == "zero":
            return bytes(n)
        if kind == "random":
            return self.rng.bytes(n)
        if kind == "text":
            return self._text(n)
        if kind == "binary":
            return self._records(n)
        raise ValueError(f"unknown content kind {kind!r}")

    def _text(self, n: int) -> bytes:
        """Lines drawn at random from a pool of 2**18 distinct lines (~17 MB)."""
        if self._lines is None:
            self._lines = self._make_lines(1 << 18)
        avg = self._lines_avg
        # Runs of consecutive pool lines, as files hold coherent stretches of text.
        want = int(n / avg * 1.05) + 64
        lines = self._lines
        parts: list[bytes] = []
        got = 0
        while got < want:
            run = int(self.rng.integers(16, 256))
            start = int(self.rng.integers(0, len(lines) - run))
            parts.extend(lines[start:start + run])
            got += run
        out = b"".join(parts)
        while len(out) < n:
            out += self._text(n - len(out))
        return out[:n]

    def _make_lines(self, count: int) -> list[bytes]:
        """Lines of Zipf-distributed words, 20..140 bytes (slow path, done once).

        Every other block of lines looks like a syslog (timestamp, host, service, pid).
        """
        lines: list[bytes] = []
        services = [b"sshd", b"cron", b"nginx", b"postgres", b"kernel", b"systemd", b"app"]
        clock = 0
        while len(lines) < count:
            blob = self._words(4 * MIB)
            cuts = np.cumsum(self.rng.integers(20, 140, 4 * MIB // 20))
            cuts = cuts[cuts < len(blob)]
            pieces = np.split(np.frombuffer(blob, dtype=np.uint8), cuts)[:-1]
            logs = len(lines) // 4096 % 2 == 1
            for p in pieces:
                text = p.tobytes().strip()
                if logs:
                    clock += int(self.rng.integers(0, 3000))
                    sec = clock // 1000
                    svc = services[int(self.rng.integers(0, len(services)))]
                    text = (b"Nov 25 %02d:%02d:%02d.%03d node-%d %s[%d]: " % (
                        sec // 3600 % 24, sec // 60 % 60, sec % 60, clock % 1000,
                        clock % 3, svc, 1000 + len(svc) * 7)) + text
                lines.append(text + b"\n")
        del lines[count:]
        self._lines_avg = sum(len(x) for x in lines) / len(lines)
        return lines

    def _words(self, n: int) -> bytes:
        avg = float((self._lens * self._word_p).sum())
        count = int(n / avg * 1.1) + 16
        idx = self.rng.choice(len(self._lens), size=count, p=self._word_p)
        lens = self._lens[idx]
        ends = np.cumsum(lens)
        keep = int(np.searchsorted(ends, n)) + 1
        idx, lens = idx[:keep], lens[:keep]
        first = np.concatenate(([0], np.cumsum(lens)[:-1]))
        word_of_byte = np.repeat(np.arange(keep), lens)
        src = self._starts[idx][word_of_byte] + (np.arange(word_of_byte.size) - first[word_of_byte])
        return self._pool[src][:n].tobytes()

    def _records(self, n: int) -> bytes:
        dt = np.dtype([("id", "<u8"), ("ts", "<u8"), ("tag", "<u8"), ("count", "<u4"),
                       ("flags", "<u4"), ("value", "<f8"), ("pad", "V24")])
        count = -(-n // dt.itemsize)
        rec = np.zeros(count, dtype=dt)
        base_id = int(self.rng.integers(0, 2**40))
        rec["id"] = np.arange(base_id, base_id + count, dtype=np.uint64)
        rec["ts"] = 1_700_000_000_000 + np.cumsum(self.rng.integers(0, 5000, count))
        rec["tag"] = self._record_tags[self.rng.integers(0, self._record_tags.size, count)]
        rec["count"] = self.rng.poisson(20, count).astype(np.uint32)
        rec["flags"] = self.rng.integers(0, 4, count).astype(np.uint32) << 8
        rec["value"] = np.round(self.rng.normal(100.0, 15.0, count), 2)
        return rec.tobytes()[:n]


def _extent_lengths(rng: np.random.Generator, size: int) -> list[int]:
    lens: list[int] = []
    total = 0
    lo, hi = np.log(UNIT), np.log(MAX_EXTENT)
    while total < size:
        n = int(np.exp(rng.uniform(lo, hi))) // UNIT * UNIT
        n = max(UNIT, min(n, size - total))
        lens.append(n)
        total += n
    return lens


def make_bench_image(
    path: str | os.PathLike[str],
    size: int,
    seed: int = 1,
    mix: Mapping[str, float] | None = None,
) -> ImageStats:
    """Write a sparse raw image of ``size`` bytes (a multiple of 64 KiB) at ``path``."""
    if size <= 0 or size % UNIT:
        raise ValueError("size must be a positive multiple of 64 KiB")
    mix = dict(DEFAULT_MIX if mix is None else mix)
    kinds = sorted(mix)
    p = np.array([mix[k] for k in kinds], dtype=float)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    gen = ContentGenerator(rng)
    stats = ImageStats(size=size, bytes_by_kind=dict.fromkeys(kinds, 0))
    data_mibs: list[int] = []  # 1 MiB-aligned regions holding original (non-repeat) data
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        off = 0
        for n in _extent_lengths(rng, size):
            kind = str(rng.choice(kinds, p=p))
            if kind == "repeat":
                n = _write_repeat(fd, rng, gen, off, n, data_mibs)
            elif kind != "hole":
                os.pwrite(fd, gen.make(kind, n), off)
                if kind != "zero":
                    first = -(-off // MIB)
                    data_mibs.extend(range(first, (off + n) // MIB))
            stats.bytes_by_kind[kind] += n
            stats.extents.append((off, n, kind))
            off += n
    finally:
        os.close(fd)
    return stats


def _write_repeat(
    fd: int, rng: np.random.Generator, gen: ContentGenerator, off: int, n: int,
    data_mibs: list[int],
) -> int:
    """Copy earlier 1 MiB-aligned data to the same alignment; text fills the rest."""
    if not data_mibs:
        os.pwrite(fd, gen.make("text", n), off)
        return n
    pos = off
    end = off + n
    head = min(end, -(-off // MIB) * MIB) - off
    if head:
        os.pwrite(fd, gen.make("text", head), pos)
        pos += head
    while pos + MIB <= end:
        src = data_mibs[int(rng.integers(0, len(data_mibs)))] * MIB
        run = 1
        # Copy a run of consecutive earlier MiBs, as a duplicated file would be.
        while pos + (run + 1) * MIB <= end and run < 8:
            run += 1
        data = os.pread(fd, run * MIB, src)
        if len(data) < run * MIB:
            data += bytes(run * MIB - len(data))
        os.pwrite(fd, data, pos)
        pos += run * MIB
    if pos < end:
        os.pwrite(fd, gen.make("text", end - pos), pos)
    return n
