"""``Repository``: config, packs, index files, restore points and locks over a ``Backend``.

Format 2 (docs/FORMAT.md). Nothing here touches the filesystem: every object goes
through the backend (``LocalBackend`` for a directory).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from snapferry.engine.errors import CorruptionError, RepositoryError, UsageError
from snapferry.engine.store import keys, locks
from snapferry.engine.store.backend import Backend, ObjectInfo, ObjectMissing
from snapferry.engine.store.backends.local import LocalBackend
from snapferry.engine.store.blobs import TYPE_CHUNK, TYPE_PAGE, encode
from snapferry.engine.store.chunkindex import ChunkIndex
from snapferry.engine.store.chunks import ChunkReader, ChunkWriterSpec
from snapferry.engine.store.crypto import NO_SEALER, MasterKeys, PlainSealer, SealedBackend, Sealer
from snapferry.engine.store.hashing import chunk_id
from snapferry.engine.store.index import PAGE_ENTRIES, DiskIndex
from snapferry.engine.store.manifest import Manifest, decode_pages, encode_pages
from snapferry.engine.store.pack import PackWriter, WrittenObjects

REPO_FORMAT = 2
REPO_KIND = "snapferry-repository"
from snapferry.engine.repo_defaults import DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL  # noqa: E402

DEFAULT_PACK_SIZE = 32 << 20  # see docs/chunk-size.md, *Pack size*
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 4 << 20
MAX_ZSTD_LEVEL = 19
ENCRYPTIONS = ("none", "repokey")
_BACKUP_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_.:-")


def check_chunk_size(cs: Any) -> int:
    if (
        not isinstance(cs, int) or isinstance(cs, bool) or cs <= 0 or cs & (cs - 1)
        or not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE
    ):
        raise UsageError(
            f"chunk size must be a power of two from {MIN_CHUNK_SIZE >> 10} KiB "
            f"to {MAX_CHUNK_SIZE >> 20} MiB, not {cs}"
        )
    return cs


def _valid_backup_id(s: str) -> bool:
    return bool(s) and s[0].isalnum() and set(s) <= _BACKUP_ID_CHARS and len(s) <= 100


def _is_s3(path: Path | str) -> bool:
    """``s3open.is_s3_url``, without importing the S3 backend for a directory."""
    return str(path).startswith("s3://")


def backend_at(path: Path | str) -> Backend:
    """The backend of an existing repository location: an ``s3://`` URL or a directory.
    The S3 modules load only for an S3 location (~15 ms at every start otherwise)."""
    if _is_s3(path):
        from snapferry.engine.store.backends.s3open import open_s3

        return open_s3(str(path))
    return LocalBackend(str(path))


@dataclass
class ScanResult:
    manifests: list[Manifest] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (backup id, why)


class StoreView:
    """Compatibility view of the chunk store for tests and tools written for format 1
    (``iterate``, ``temp_files``). New code uses ``Repository.chunk_index``/``reader``."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo

    def iterate(self) -> Iterator[bytes]:
        idx = ChunkIndex()
        idx.load(self._repo.backend, types=(TYPE_CHUNK,))
        return idx.ids()

    def temp_files(self) -> list[str]:
        return [f"{i.kind}/{i.name}" for i in self._repo.backend.leftovers()]

    def sync_all(self) -> None:
        self._repo.backend.sync()


class Repository:
    """An open snapferry repository. Build with ``init`` or ``open``."""

    def __init__(
        self, backend: Backend, config: dict[str, Any], sealer: Sealer | None = None
    ) -> None:
        self.sealer: PlainSealer = sealer or NO_SEALER  # docs/FORMAT.md, *Encryption*
        self.backend: Backend = SealedBackend(backend, sealer) if sealer else backend
        self.path = Path(backend.location)
        self.config = config
        self.chunk_size: int = config["chunk_size"]
        self.seed: int = sealer.seed if sealer else int(config["seed"], 16)
        self.zstd_level: int = config["zstd_level"]
        self.page_entries: int = config["page_entries"]
        self.pack_size: int = config["pack_size"]
        self.id: str = config["id"]
        self.store = StoreView(self)

    def __repr__(self) -> str:
        return f"Repository({self.backend.location!r})"

    # -- creation / opening --------------------------------------------------------
    @classmethod
    def init(
        cls,
        path: Path | str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        *,
        pack_size: int = DEFAULT_PACK_SIZE,
        encryption: str = "none",
        passphrase: str | None = None,
    ) -> Repository:
        check_chunk_size(chunk_size)
        if isinstance(zstd_level, bool) or not isinstance(zstd_level, int) or not (
            1 <= zstd_level <= MAX_ZSTD_LEVEL
        ):
            raise UsageError(f"compression level must be 1..{MAX_ZSTD_LEVEL}, not {zstd_level}")
        if not (1 << 20) <= pack_size <= (1 << 30):
            raise UsageError(f"pack size must be 1 MiB .. 1 GiB, not {pack_size}")
        if encryption not in ENCRYPTIONS:
            raise UsageError(f"encryption must be one of {', '.join(ENCRYPTIONS)}")
        if encryption != "none" and not passphrase:
            raise UsageError("an encrypted repository needs a passphrase")
        if _is_s3(path):  # a bucket (engine/store/backends/s3open.py)
            from snapferry.engine.store.backends.s3open import new_s3

            backend: Backend = new_s3(str(path))
        else:
            p = Path(path)
            backend = LocalBackend(str(p), create=True)
            if not backend.is_empty():
                raise RepositoryError(f"{p} is not empty; a new repository needs an empty dir")
        config = {
            "format": REPO_FORMAT,
            "kind": REPO_KIND,
            "id": str(uuid.uuid4()),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "chunk_size": chunk_size,
            "seed": f"{secrets.randbits(64):016x}",
            "id_hash": "xxh3-128",
            "digest": "blake3-256",
            "compression": "zstd",
            "zstd_level": zstd_level,
            "page_entries": PAGE_ENTRIES,
            "pack_size": pack_size,
            "encryption": "none",
            "key_id": 0,
        }
        sealer = None
        if encryption != "none":  # the key object first: a config never lacks its key
            master = MasterKeys.generate()
            config.update(encryption=encryption, key_id=master.key_id, seed="0" * 16,
                          id_hash="xxh3-128-keyed", digest="blake3-256-keyed",
                          aead="aes-256-gcm")
            keys.save_key_object(backend, keys.wrap(master, passphrase or "", str(config["id"])))
            sealer = Sealer(master)
        if not backend.save("config", "config", (json.dumps(config, indent=2) + "\n").encode()):
            raise RepositoryError(f"{backend.location} already holds a repository")
        return cls(backend, config, sealer)

    @classmethod
    def open(cls, path: Path | str, passphrase: str | None = None) -> Repository:
        return cls.open_backend(backend_at(path), passphrase)

    @classmethod
    def open_backend(cls, backend: Backend, passphrase: str | None = None) -> Repository:
        where = backend.location
        try:
            raw = backend.load("config", "config")
        except ObjectMissing:
            raise RepositoryError(
                f"{where} is not a snapferry repository (no config file)"
            ) from None
        try:
            config = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RepositoryError(
                f"{where} is not a snapferry repository (config is not JSON)"
            ) from None
        if not isinstance(config, dict) or config.get("kind") != REPO_KIND:
            raise RepositoryError(f"{where} is not a snapferry repository (unknown config)")
        fmt = config.get("format")
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise CorruptionError(f"{where}/config: no format number")
        if fmt == 1:
            raise RepositoryError(
                f"repository {where} has format 1 (one file per chunk), which this snapferry "
                "no longer reads: restore from it with snapferry 0.1 and back up into a new "
                "repository"
            )
        if fmt > REPO_FORMAT:
            raise RepositoryError(
                f"repository {where} has format {fmt}, newer than this snapferry supports "
                f"({REPO_FORMAT}); upgrade snapferry"
            )
        if fmt != REPO_FORMAT:
            raise CorruptionError(f"{where}/config: unknown format {fmt}")
        try:
            try:
                check_chunk_size(config["chunk_size"])
            except UsageError as e:
                raise ValueError(str(e)) from None
            int(config["seed"], 16)
            lvl = config["zstd_level"]
            if not isinstance(lvl, int) or isinstance(lvl, bool) or not 1 <= lvl <= 22:
                raise ValueError("zstd_level")
            if not isinstance(config["id"], str):
                raise ValueError("id")
            pe = config["page_entries"]
            if not isinstance(pe, int) or pe < 256 or pe > 65536 or pe & (pe - 1):
                raise ValueError("page_entries")
            ps = config["pack_size"]
            if not isinstance(ps, int) or not (1 << 20) <= ps <= (1 << 30):
                raise ValueError("pack_size")
            enc = config.get("encryption", "none")
            if enc not in ENCRYPTIONS:
                raise RepositoryError(
                    f"repository {where} uses encryption {enc!r}, unknown to this snapferry"
                )
            if not isinstance(config.get("key_id", 0), int) or (enc == "none") != (
                config.get("key_id", 0) == 0
            ):
                raise ValueError("key_id")
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptionError(f"{where}/config: invalid config ({e})") from None
        if enc != "none":
            sealer, _name = keys.unlock(backend, config, passphrase)
            return cls(backend, config, sealer)
        return cls(backend, config)

    # -- locking -------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, purpose: str = "backup", *, exclusive: bool = False) -> Iterator[None]:
        """Hold the shared role (backups; many at once) or, with ``exclusive``, the
        deleters' role (alone). See docs/FORMAT.md, *Locks*."""
        role: locks.Role = "exclusive" if exclusive else "shared"
        with locks.hold(self.backend, role, purpose, self.backend.location):
            yield

    @contextlib.contextmanager
    def reading(self, purpose: str, warn: Callable[[str], None]) -> Iterator[None]:
        """Hold the shared role while reading (restore, verify), so that no prune deletes
        beneath the reader; a repository that takes no lock object (read-only) is read
        without one after one ``warn``. See docs/FORMAT.md, rule D8."""
        with locks.reading(self.backend, purpose, self.backend.location, warn):
            yield

    # -- restore points ------------------------------------------------------------
    def new_backup_id(self) -> str:
        """Sortable unique id, e.g. ``20261125T193924Z-3f9a01c2``."""
        now = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return f"{now}-{secrets.token_hex(4)}"

    def _read_manifest(self, name: str) -> Manifest:
        what = f"restore point {name}"
        try:
            text = self.backend.load("snapshots", name)
        except ObjectMissing:
            raise RepositoryError(f"no restore point {name!r} in {self.backend.location}") from None
        m = Manifest.from_json(text, name=what)
        if m.backup_id != name:
            raise CorruptionError(f"{what}: manifest names another backup id {m.backup_id!r}")
        if m.chunk_size != self.chunk_size:
            raise CorruptionError(f"{what}: chunk size {m.chunk_size} != the repository's")
        return m

    def scan(self, vm: str | None = None) -> ScanResult:
        """Every restore point (of ``vm``), oldest first; damaged manifests apart."""
        out = ScanResult()
        for info in self.backend.objects("snapshots"):
            try:
                m = self._read_manifest(info.name)
            except RepositoryError as e:
                out.bad.append((info.name, str(e)))
                continue
            if vm is None or m.vm == vm:
                out.manifests.append(m)
        out.manifests.sort(key=lambda m: (m.created, m.backup_id))
        return out

    def list_backups(self, vm: str | None = None) -> list[Manifest]:
        """Committed restore points (of ``vm``, or all), oldest first. Damaged manifests
        are skipped (``scan`` and ``verify`` report them)."""
        return self.scan(vm).manifests

    def load_manifest(self, backup_id: str) -> Manifest:
        if not _valid_backup_id(backup_id):
            raise RepositoryError(f"no restore point {backup_id!r} in {self.backend.location}")
        return self._read_manifest(backup_id)

    def has_backup(self, backup_id: str) -> bool:
        return _valid_backup_id(backup_id) and self.backend.stat("snapshots", backup_id) is not None

    def latest(self, vm: str) -> Manifest | None:
        b = self.list_backups(vm)
        return b[-1] if b else None

    # -- chunk index, readers, writers ---------------------------------------------
    def chunk_index(self, *, types: tuple[int, ...] | None = None) -> ChunkIndex:
        idx = ChunkIndex()
        idx.load(self.backend, types=types)
        return idx

    def reader(self, index: ChunkIndex | None = None) -> ChunkReader:
        return ChunkReader(self.backend, self.seed, index or self.chunk_index())

    def writer_spec(self) -> ChunkWriterSpec:
        return ChunkWriterSpec(self.backend.spec(), self.seed, self.zstd_level, self.pack_size)

    def load_index(
        self,
        backup_id: str,
        disk: str,
        manifest: Manifest | None = None,
        *,
        reader: ChunkReader | None = None,
    ) -> DiskIndex:
        """The paged index of one disk; pages load lazily through ``reader`` (by
        default one over the page blobs only)."""
        m = manifest if manifest is not None else self.load_manifest(backup_id)
        try:
            entry = m.disk(disk)
        except KeyError:
            raise RepositoryError(
                f"restore point {backup_id} has no disk {disk!r} "
                f"(disks: {', '.join(m.disk_names) or 'none'})"
            ) from None
        if entry.page_entries != self.page_entries:
            raise CorruptionError(f"restore point {backup_id}, disk {disk}: page size differs")
        rd = reader or self.reader(self.chunk_index(types=(TYPE_PAGE,)))
        pages = decode_pages(entry.pages)
        idx = DiskIndex(entry.virtual_size, self.chunk_size, page_entries=entry.page_entries,
                        page_ids=pages, loader=rd.page, base_zero=entry.zero_chunks)
        return idx

    # -- commit --------------------------------------------------------------------
    def write_pages(
        self, index: DiskIndex, pw: PackWriter, known: ChunkIndex | None = None,
        seen: set[bytes] | None = None,
    ) -> int:
        """Store the dirty pages of ``index`` (unchanged ones keep their ids; a page
        already in ``known`` with the same digest is reused); returns the number of
        page blobs added."""
        added = 0
        for p in sorted(index.dirty):
            arr = index._loaded.get(p)
            if arr is None or not arr.any():
                index.page_ids[p] = None
                continue
            raw = np.ascontiguousarray(arr).tobytes()
            pid = chunk_id(self.seed, raw)
            if pid == index.page_ids[p]:
                continue
            digest = self.sealer.digest(raw)
            index.page_ids[p] = pid
            if seen is not None and pid in seen:
                continue
            if known is not None and known.lookup_valid(pid, digest, len(raw)):
                continue
            codec, stored = encode(raw, level=self.zstd_level)
            pw.add(pid, TYPE_PAGE, codec, stored, len(raw), digest)
            if seen is not None:
                seen.add(pid)
            added += 1
        index.dirty.clear()
        return added

    def check_collisions(self, own_indexes: list[str], known_at_start: set[str]) -> None:
        """Rule W5: no index file written since this backup started (by anyone) names
        one of this backup's ids with other data. Raises ``CorruptionError``."""
        own = set(own_indexes)
        t = ChunkIndex()
        t.load(self.backend, skip=known_at_start - own)
        tab = t.table
        if len(tab) < 2:
            return
        same = (tab["hi"][1:] == tab["hi"][:-1]) & (tab["lo"][1:] == tab["lo"][:-1])
        dig = tab["digest"]
        clash = same & ((dig[1:] != dig[:-1]) | (tab["raw_len"][1:] != tab["raw_len"][:-1]))
        if clash.any():
            i = int(np.flatnonzero(clash)[0])
            cid = (int(tab["hi"][i]).to_bytes(8, "big") + int(tab["lo"][i]).to_bytes(8, "big"))
            raise CorruptionError(
                f"chunk id {cid.hex()} was stored with different data by two writers at once "
                "(hash collision/alias): this backup was not committed"
            )

    def commit_restore_point(
        self,
        manifest: Manifest,
        indexes: dict[str, DiskIndex],
        *,
        written: WrittenObjects | None = None,
        known_at_start: set[str] | None = None,
        known_pages: ChunkIndex | None = None,
    ) -> str:
        """Pages -> index file -> collision check -> sync -> manifest (the commit).

        ``written`` are the packs/index files the workers saved (their index files are
        durable: rule W3); ``known_at_start`` the index files that existed when the
        backup started (for rule W5; None: every index file is checked);
        ``known_pages`` the page entries the backup loaded at its start (``load_index``),
        brought up to date here instead of loading every index file again. Fills each
        disk entry's ``pages``, ``chunks`` and ``zero_chunks``. Returns the backup id.
        """
        names = manifest.disk_names
        if not _valid_backup_id(manifest.backup_id):
            raise ValueError(f"invalid backup id {manifest.backup_id!r}")
        if sorted(names) != sorted(indexes):
            raise ValueError(f"manifest disks {names} != indexes {sorted(indexes)}")
        if manifest.chunk_size != self.chunk_size:
            raise ValueError("manifest chunk size differs from the repository's")
        for entry in manifest.disks:
            idx = indexes[entry.name]
            if idx.chunk_size != self.chunk_size or idx.virtual_size != entry.virtual_size:
                raise ValueError(f"index of disk {entry.name} does not match its entry")
        if self.has_backup(manifest.backup_id):
            raise RepositoryError(f"restore point {manifest.backup_id} already exists")
        own = WrittenObjects()
        if written is not None:
            own.extend(written)
        pw = PackWriter(self.backend, self.pack_size)
        if known_pages is not None:
            known = known_pages
            known.load(self.backend, types=(TYPE_PAGE,))  # the index files added since
        else:
            known = self.chunk_index(types=(TYPE_PAGE,))
        seen: set[bytes] = set()
        try:
            for entry in manifest.disks:
                idx = indexes[entry.name]
                self.write_pages(idx, pw, known, seen)
                entry.chunks = len(idx)
                entry.zero_chunks = idx.zero_count()
                entry.page_entries = idx.page_entries
                entry.pages = encode_pages(idx.page_ids)
            own.extend(pw.flush())
            self.check_collisions(own.indexes, known_at_start or set())
            if self.backend.properties.needs_sync:
                self.backend.sync()
            data = manifest.to_json().encode()
            while not self.backend.save("snapshots", manifest.backup_id, data):
                manifest.backup_id = self.new_backup_id()  # W2: a fresh name
                data = manifest.to_json().encode()
        except BaseException:
            self.remove_objects(pw.written)
            raise
        return manifest.backup_id

    def remove_objects(self, w: WrittenObjects) -> None:
        """Remove a failed writer's own packs and index files (index files first)."""
        for name in w.indexes:
            with contextlib.suppress(RepositoryError):
                self.backend.remove("index", name)
        for name in w.packs:
            with contextlib.suppress(RepositoryError):
                self.backend.remove("data", name)

    def index_names(self) -> set[str]:
        return {i.name for i in self.backend.objects("index")}

    def leftovers(self) -> list[ObjectInfo]:
        return self.backend.leftovers()
