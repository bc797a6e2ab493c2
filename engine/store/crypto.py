"""Encryption at rest: the ``Sealer`` and the ``SealedBackend`` (docs/FORMAT.md, *Encryption*).

A ``Sealer`` holds a repository's master key set (``MasterKeys``) and does every
cryptographic step the store needs:

* chunk ids: XXH3-128 with the secret 64-bit seed of the key set (``seed``);
* strong digests: keyed BLAKE3 with the MAC key (``digest``);
* blobs inside packs, pack trailers and whole objects (index files, manifests,
  damaged lists): AES-256-GCM with a random 96-bit nonce, associated data binding the
  bytes to where they belong (kind + name, or pack + offset + type + id for a blob);
* the verification tag of each stored object: keyed BLAKE3 with the *verification
  key* over the sealed bytes, so a holder of that key alone can check integrity but
  cannot decrypt.

``NO_SEALER`` (a ``PlainSealer``) is the unencrypted repository: plain BLAKE3, blobs as
they are. ``SealedBackend`` wraps a ``Backend`` so that whole objects of the sealed
kinds are sealed on ``save`` and opened on ``load``; packs pass through (their blobs
and trailers are sealed by ``PackWriter``). ``sealer_of(backend)`` is how pack, chunk
and index code find the sealer without a new parameter.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from snapferry.engine.errors import CorruptionError
from snapferry.engine.store.backend import Backend, BackendProperties, BackendSpec, ObjectInfo

NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE  # 28 bytes per sealed blob / trailer
VMAC_SIZE = 32
CODEC_MASK = 0x0F
ENC_AES_GCM = 1
"""Value of the codec byte's bits 4..7 for a blob sealed with AES-256-GCM."""
SEALED_KINDS = ("index", "snapshots", "damaged")
"""Kinds stored whole as sealed envelopes in an encrypted repository."""
ENVELOPE_MAGIC = b"SFSE"
ENVELOPE_VERSION = 2
ENVELOPE_HEADER = struct.Struct(">4sHHII")  # magic, version, flags, key_id, reserved: 16
ENVELOPE_MIN = ENVELOPE_HEADER.size + SEAL_OVERHEAD + VMAC_SIZE
MASTER_FORMAT = struct.Struct(">I32s32s32s8s")  # key_id, data key, MAC key, verify key, seed
VERIFY_CONTEXT = b"snapferry verify v2\0"


@dataclass(frozen=True)
class MasterKeys:
    """The random key set of one repository (wrapped in every ``keys/`` object)."""

    key_id: int
    data_key: bytes  # AES-256-GCM
    mac_key: bytes  # keyed BLAKE3: strong digests, index file names
    verify_key: bytes  # keyed BLAKE3 over ciphertext: integrity without decryption
    seed: bytes  # 8 bytes: the XXH3 seed of chunk ids

    @classmethod
    def generate(cls) -> MasterKeys:
        key_id = 0
        while key_id == 0:
            key_id = int.from_bytes(os.urandom(4), "big")
        return cls(key_id, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(8))

    def to_bytes(self) -> bytes:
        return MASTER_FORMAT.pack(
            self.key_id, self.data_key, self.mac_key, self.verify_key, self.seed
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> MasterKeys:
        if len(raw) != MASTER_FORMAT.size:
            raise CorruptionError("master key has the wrong length")
        key_id, dk, mk, vk, seed = MASTER_FORMAT.unpack(raw)
        if key_id == 0:
            raise CorruptionError("master key has key id 0")
        return cls(key_id, dk, mk, vk, seed)


def verify_mac(
    verify_key: bytes, kind: str, name: str, *parts: bytes | bytearray | memoryview
) -> bytes:
    """The verification tag: keyed BLAKE3 (verification key) of kind, name and the
    sealed bytes. For damaged objects ``name`` is empty (their name is this tag's hex)."""
    h = blake3.blake3(key=verify_key)
    h.update(VERIFY_CONTEXT + kind.encode() + b"\0" + name.encode() + b"\0")
    for p in parts:
        h.update(p)
    return h.digest()


def _name_in_mac(kind: str, name: str) -> str:
    return "" if kind == "damaged" else name


class PlainSealer:
    """No encryption: today's format byte for byte."""

    encrypted = False
    key_id = 0

    def digest(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data).digest()

    def seal_blob(
        self, stored: bytes | memoryview, *, pack: bytes, offset: int, btype: int, cid: bytes
    ) -> bytes | memoryview:
        return stored

    def open_blob(
        self, stored: bytes | memoryview, *, pack: str, offset: int, btype: int, cid: bytes,
        codec: int,
    ) -> bytes | memoryview:
        if codec >> 4:
            raise CorruptionError(f"blob {cid.hex()} is encrypted in an unencrypted repository")
        return stored


    def open_blob_into(
        self, stored: bytes | memoryview, out: bytearray, *, pack: str, offset: int,
        btype: int, cid: bytes, codec: int, pack_id: bytes | None = None,
    ) -> bytes | memoryview:
        """``open_blob``, writing into ``out`` when it can (no allocation per blob);
        returns the plaintext (a view of ``out``, or of ``stored`` when not sealed).
        ``pack_id`` is ``pack`` as bytes, when the caller has it (saves a parse)."""
        return self.open_blob(stored, pack=pack, offset=offset, btype=btype, cid=cid,
                              codec=codec)


NO_SEALER = PlainSealer()


class Sealer(PlainSealer):
    """An encrypted repository's key set in use (see the module doc). Picklable."""

    encrypted = True

    def __init__(self, keys: MasterKeys) -> None:
        self.keys = keys
        self.key_id = keys.key_id
        self._aead = AESGCM(keys.data_key)
        # cryptography >= 45 decrypts into a caller's buffer; older ones (Debian's 38,
        # in nbdkit's Python) only return bytes
        self._decrypt_into = getattr(self._aead, "decrypt_into", None)

    def __getstate__(self) -> bytes:
        return self.keys.to_bytes()

    def __setstate__(self, state: bytes) -> None:
        self.__init__(MasterKeys.from_bytes(state))  # type: ignore[misc]

    @property
    def seed(self) -> int:
        return int.from_bytes(self.keys.seed, "big")

    def digest(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self.keys.mac_key).digest()

    # -- AEAD ---------------------------------------------------------------------------
    def _seal(self, data: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def _open(self, sealed: bytes | memoryview, aad: bytes, what: str) -> bytes:
        mv = memoryview(sealed)
        if mv.nbytes < SEAL_OVERHEAD:
            raise CorruptionError(f"{what}: too short to be sealed")
        try:
            try:
                return self._aead.decrypt(mv[:NONCE_SIZE], mv[NONCE_SIZE:], aad)
            except TypeError:  # cryptography < 40 (Debian's, in nbdkit's Python): bytes only
                return self._aead.decrypt(bytes(mv[:NONCE_SIZE]), bytes(mv[NONCE_SIZE:]), aad)
        except InvalidTag:
            raise CorruptionError(
                f"{what}: authentication failed (tampered, moved or swapped ciphertext)"
            ) from None

    @staticmethod
    def _blob_aad(pack: bytes, offset: int, btype: int, cid: bytes) -> bytes:
        return b"SFblob" + pack + struct.pack(">QB", offset, btype) + cid

    def seal_blob(
        self, stored: bytes | memoryview, *, pack: bytes, offset: int, btype: int, cid: bytes
    ) -> bytes:
        return self._seal(stored, self._blob_aad(pack, offset, btype, cid))

    def open_blob(
        self, stored: bytes | memoryview, *, pack: str, offset: int, btype: int, cid: bytes,
        codec: int,
    ) -> bytes:
        if codec >> 4 != ENC_AES_GCM:
            raise CorruptionError(f"blob {cid.hex()} is not sealed in an encrypted repository")
        aad = self._blob_aad(bytes.fromhex(pack), offset, btype, cid)
        return self._open(stored, aad, f"blob {cid.hex()} in pack {pack[:16]}")

    def open_blob_into(
        self, stored: bytes | memoryview, out: bytearray, *, pack: str, offset: int,
        btype: int, cid: bytes, codec: int, pack_id: bytes | None = None,
    ) -> bytes | memoryview:
        mv = memoryview(stored)
        n = mv.nbytes - SEAL_OVERHEAD
        into = self._decrypt_into
        if into is None or codec >> 4 != ENC_AES_GCM or n < 0 or n > len(out):
            return self.open_blob(stored, pack=pack, offset=offset, btype=btype, cid=cid,
                                  codec=codec)
        aad = self._blob_aad(bytes.fromhex(pack) if pack_id is None else pack_id, offset,
                             btype, cid)
        dst = memoryview(out)[:n]
        try:
            into(mv[:NONCE_SIZE], mv[NONCE_SIZE:], aad, dst)
        except InvalidTag:
            raise CorruptionError(
                f"blob {cid.hex()} in pack {pack[:16]}: authentication failed (tampered, "
                "moved or swapped ciphertext)"
            ) from None
        return dst

    def pack_tag(self, name: str, upto: bytes | bytearray | memoryview) -> bytes:
        """A pack's verification tag: over every byte before the footer's digest field."""
        return verify_mac(self.keys.verify_key, "data", name, upto)

    def seal_trailer(self, header: bytes, trailer: bytes) -> bytes:
        return self._seal(trailer, b"SFtrailer" + header)

    def open_trailer(self, header: bytes, sealed: bytes, what: str) -> bytes:
        return self._open(sealed, b"SFtrailer" + header, f"{what} trailer")

    # -- whole objects (index files, manifests, damaged lists) ---------------------------
    def seal_object(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> bytes:
        header = ENVELOPE_HEADER.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, 0, self.key_id, 0)
        aad = header + kind.encode() + b"/" + _name_in_mac(kind, name).encode()
        body = header + self._seal(data, aad)
        return body + verify_mac(self.keys.verify_key, kind, _name_in_mac(kind, name), body)

    def open_object(self, kind: str, name: str, blob: bytes) -> bytes:
        what = f"{kind}/{name[:24]}"
        check_envelope(self.keys.verify_key, kind, name, blob, key_id=self.key_id)
        body = memoryview(blob)[ENVELOPE_HEADER.size : -VMAC_SIZE]
        header = blob[: ENVELOPE_HEADER.size]
        aad = header + kind.encode() + b"/" + _name_in_mac(kind, name).encode()
        return self._open(body, aad, what)

    def object_name(self, kind: str, sealed: bytes) -> str:
        """Name of a damaged object: its verification tag's hex."""
        return sealed[-VMAC_SIZE:].hex()


def check_envelope(verify_key: bytes, kind: str, name: str, blob: bytes, *, key_id: int) -> None:
    """Integrity of a sealed whole object with the verification key only."""
    what = f"{kind}/{name[:24]}"
    if len(blob) < ENVELOPE_MIN:
        raise CorruptionError(f"{what}: too short to be a sealed object (truncated)")
    magic, version, _flags, kid, _r = ENVELOPE_HEADER.unpack_from(blob, 0)
    if magic != ENVELOPE_MAGIC:
        raise CorruptionError(f"{what}: not a sealed object (bad magic)")
    if version != ENVELOPE_VERSION:
        raise CorruptionError(f"{what}: sealed-object version {version} is not supported")
    if kid != key_id:
        raise CorruptionError(f"{what}: sealed with key {kid:08x}, not this repository's")
    tag = verify_mac(verify_key, kind, _name_in_mac(kind, name), memoryview(blob)[:-VMAC_SIZE])
    if tag != blob[-VMAC_SIZE:] or (kind == "damaged" and tag.hex() != name):
        raise CorruptionError(
            f"{what}: verification tag mismatch (altered, truncated or renamed object)"
        )


AnySealer = PlainSealer  # Sealer is a PlainSealer: the type every hook takes


def sealer_of(backend: Backend) -> PlainSealer:
    """The sealer of a backend: the key set of a ``SealedBackend``, else ``NO_SEALER``."""
    s = getattr(backend, "sealer", None)
    return s if isinstance(s, PlainSealer) else NO_SEALER


@dataclass(frozen=True)
class SealedBackendSpec:
    """Picklable: reopens the inner backend in a worker, wrapped with the same key set."""

    inner: BackendSpec
    sealer: Sealer

    def open(self) -> Backend:
        return SealedBackend(self.inner.open(), self.sealer)


class SealedBackend:
    """A ``Backend`` whose whole objects of ``SEALED_KINDS`` are sealed envelopes."""

    def __init__(self, inner: Backend, sealer: Sealer) -> None:
        self.inner = inner
        self.sealer = sealer

    @property
    def properties(self) -> BackendProperties:
        return self.inner.properties

    @property
    def location(self) -> str:
        return self.inner.location

    def spec(self) -> BackendSpec:
        return SealedBackendSpec(self.inner.spec(), self.sealer)

    def save(
        self, kind: str, name: str, data: bytes | bytearray | memoryview, *, if_absent: bool = True
    ) -> bool:
        if kind in SEALED_KINDS:
            data = self.sealer.seal_object(kind, name, data)
            if kind == "damaged":
                name = self.sealer.object_name(kind, data)
        return self.inner.save(kind, name, data, if_absent=if_absent)

    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if kind not in SEALED_KINDS:
            return self.inner.load(kind, name, offset, length)
        plain = self.sealer.open_object(kind, name, self.inner.load(kind, name))
        end = None if length is None else offset + length
        return plain[offset:end]

    def objects(self, kind: str, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.objects(kind, prefix)

    def stat(self, kind: str, name: str) -> ObjectInfo | None:
        return self.inner.stat(kind, name)

    def remove(self, kind: str, name: str) -> None:
        self.inner.remove(kind, name)

    def sync(self) -> None:
        self.inner.sync()

    def leftovers(self) -> list[ObjectInfo]:
        return self.inner.leftovers()

    def remove_leftover(self, info: ObjectInfo) -> None:
        self.inner.remove_leftover(info)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, attr: str) -> object:  # backend-specific extras (is_empty, ...)
        return getattr(self.inner, attr)


# -- verification with the verification key only ---------------------------------------


@dataclass
class CiphertextReport:
    """What ``check_ciphertext`` found: objects checked and the damaged ones."""

    objects: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    damaged_objects: list[str] = field(default_factory=list)
    damaged_restore_points: list[str] = field(default_factory=list)


PACK_HEAD = struct.Struct(">4sHHII32s")  # as pack.PACK_HEADER (48)
PACK_TAIL = struct.Struct(">II32sI4s")  # as pack.PACK_FOOTER (48)


def check_pack_ciphertext(verify_key: bytes, key_id: int, name: str, blob: bytes) -> None:
    """An encrypted pack's structure and verification tag (every blob and the trailer)."""
    what = f"pack {name[:16]}"
    if len(blob) < PACK_HEAD.size + PACK_TAIL.size + SEAL_OVERHEAD:
        raise CorruptionError(f"{what}: too short ({len(blob)} bytes: truncated)")
    magic, version, _f, kid, _r, pid = PACK_HEAD.unpack_from(blob, 0)
    count, tlen, tag, _r2, end = PACK_TAIL.unpack_from(blob, len(blob) - PACK_TAIL.size)
    if magic != b"SFPK" or end != b"SFPE":
        raise CorruptionError(f"{what}: bad magic (not a pack, or truncated)")
    if version != 2:
        raise CorruptionError(f"{what}: version {version} is not supported")
    if pid.hex() != name:
        raise CorruptionError(f"{what}: holds pack {pid.hex()[:16]} (objects swapped or renamed)")
    if kid != key_id:
        raise CorruptionError(f"{what}: sealed with key {kid:08x}, not this repository's")
    if tlen != count * 72 + SEAL_OVERHEAD or tlen > len(blob) - PACK_HEAD.size - PACK_TAIL.size:
        raise CorruptionError(f"{what}: trailer length is inconsistent (truncated?)")
    want = verify_mac(verify_key, "data", name, memoryview(blob)[: len(blob) - 40])
    if want != tag:
        raise CorruptionError(f"{what}: verification tag mismatch (altered or truncated)")


def check_ciphertext(backend: Backend, verify_key: bytes, key_id: int) -> CiphertextReport:
    """Check every pack, index file, manifest and damaged list of an encrypted
    repository with the verification key alone (no decryption)."""
    rep = CiphertextReport()
    for kind in ("data", *SEALED_KINDS):
        for info in sorted(backend.objects(kind), key=lambda i: i.name):
            rep.objects += 1
            rep.bytes += info.size
            try:
                blob = backend.load(kind, info.name)
                if kind == "data":
                    check_pack_ciphertext(verify_key, key_id, info.name, blob)
                else:
                    check_envelope(verify_key, kind, info.name, blob, key_id=key_id)
            except CorruptionError as e:
                rep.problems.append(str(e))
                rep.damaged_objects.append(f"{kind}/{info.name}")
                if kind == "snapshots":
                    rep.damaged_restore_points.append(info.name)
    return rep
