"""``NbdSource``: a ``DiskSource`` read over NBD with libnbd (``snapferry.native.libnbd``).

URIs are the standard NBD URIs libnbd understands: ``nbd://host[:port]/export``,
``nbd+unix:///export?socket=PATH`` (and the ``nbds`` TLS forms).

* Allocation map: the ``base:allocation`` meta context (``Extent.zero`` when the server's
  ZERO flag is set, i.e. the range reads as zeros; a HOLE without ZERO is read).
* Changed blocks: ``qemu:dirty-bitmap:NAME`` (bit 0 = dirty), as exported by
  ``qemu-nbd -B NAME`` or QEMU's ``block-export-add`` with ``bitmaps``.
* Reads: split into requests within the server's block-size limits (never above
  32 MiB, aligned to the minimum block size) with several in flight on the connection.
* Multi-conn: ``max_connections`` is 1 unless the server advertises CAN_MULTI_CONN; the
  reader pool must not open more connections (``clone``/``spec().open()``) than that.
* Client limits: a backup keeps this object's connection open from planning to the end
  (``qemu-nbd`` without ``-t`` exits when its last client leaves), so it asks
  ``spare_connections`` how many more clients the server takes *now*; a server at its
  client limit (``qemu-nbd -e 1``) leaves a new connection unanswered in its listen
  backlog, which the probe's short handshake deadline turns into "none".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from snapferry.engine.errors import SourceError
from snapferry.engine.source import Extent
from snapferry.engine.sources import NBD_SCHEMES, split_uri
from snapferry.native import _libnbd_cdef as C
from snapferry.native.libnbd import BlockSizes, BlockStatusReply, NbdError, NbdHandle

__all__ = ["NBD_SCHEMES", "NbdSource", "NbdSpec", "is_nbd_uri", "redact_uri"]

MAX_REQUEST = 32 * 1024 * 1024  # the NBD protocol's safe upper bound for one read
DEFAULT_REQUEST_SIZE = 2 * 1024 * 1024
DEFAULT_IN_FLIGHT = 8
MULTI_CONN_LIMIT = 16  # connections the pool may open when the server allows multi-conn
READ_TIMEOUT_MS = 120_000  # a server silent this long with requests in flight is stuck
CONNECT_TIMEOUT_MS = 30_000  # handshake deadline (a server at its client limit never answers)
PROBE_TIMEOUT_MS = 1_000  # spare_connections: a greeting later than this counts as "no room"
BLOCK_STATUS_MAX = 1 << 30  # bytes asked for in one NBD_CMD_BLOCK_STATUS
DIRTY = 1  # bit 0 of a qemu:dirty-bitmap context


def is_nbd_uri(uri: str) -> bool:
    return split_uri(uri).scheme.lower() in NBD_SCHEMES


def redact_uri(uri: str) -> str:
    """The URI without user info and without query parameters other than ``socket``
    (TLS key paths, passwords): safe for manifests and messages."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    keep = [(k, v) for k, v in parse_qsl(parts.query) if k == "socket"]
    query = urlencode(keep, safe="/", quote_via=quote)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True, slots=True)
class NbdSpec:
    """Picklable recipe for another connection to the same NBD export."""

    uri: str
    bitmap: str | None = None
    request_size: int = DEFAULT_REQUEST_SIZE
    max_in_flight: int = DEFAULT_IN_FLIGHT
    read_timeout_ms: int = READ_TIMEOUT_MS
    connect_timeout_ms: int = CONNECT_TIMEOUT_MS

    def open(self) -> NbdSource:
        return NbdSource.open(
            self.uri,
            bitmap=self.bitmap,
            request_size=self.request_size,
            max_in_flight=self.max_in_flight,
            read_timeout_ms=self.read_timeout_ms,
            connect_timeout_ms=self.connect_timeout_ms,
        )


class NbdSource:
    """A disk exported over NBD. Open with ``NbdSource.open(uri, bitmap=...)``."""

    kind = "nbd"

    def __init__(
        self,
        spec: NbdSpec,
        handle: NbdHandle,
        *,
        retries: int = 1,
    ) -> None:
        self._spec = spec
        self._h: NbdHandle | None = handle
        self._closed = False
        self._retries = retries
        self._timeout_ms = spec.read_timeout_ms
        self._connect_timeout_ms = spec.connect_timeout_ms
        self._size = handle.get_size()
        self._multi_conn = handle.can_multi_conn()
        self._sizes = handle.block_sizes()
        self._structured = handle.structured_replies_negotiated()
        self._has_alloc = self._structured and handle.can_meta_context(
            C.CONTEXT_BASE_ALLOCATION
        )
        self._min_block = max(1, self._sizes.minimum)
        limit = min(MAX_REQUEST, self._sizes.maximum or MAX_REQUEST)
        req = min(max(spec.request_size, self._min_block), limit)
        self._request_size = max(self._min_block, req - req % self._min_block)

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        uri: str,
        *,
        bitmap: str | None = None,
        request_size: int = DEFAULT_REQUEST_SIZE,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        read_timeout_ms: int = READ_TIMEOUT_MS,
        connect_timeout_ms: int = CONNECT_TIMEOUT_MS,
    ) -> NbdSource:
        """Connect to ``uri``; with ``bitmap`` also negotiate ``qemu:dirty-bitmap:NAME``
        and fail with a clear ``SourceError`` when the server does not export it."""
        if not is_nbd_uri(uri):
            raise SourceError(f"not an NBD URI: {redact_uri(uri)} (want nbd://... or nbd+unix://...)")
        if request_size <= 0 or max_in_flight <= 0:
            raise ValueError("request_size and max_in_flight must be positive")
        spec = NbdSpec(uri, bitmap, request_size, max_in_flight, read_timeout_ms,
                       connect_timeout_ms)
        h = _connect(spec, connect_timeout_ms)
        try:
            return cls(spec, h)
        except BaseException:
            h.close()
            raise

    # -- facts ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def uri(self) -> str:
        return self._spec.uri

    @property
    def bitmap(self) -> str | None:
        return self._spec.bitmap

    @property
    def can_multi_conn(self) -> bool:
        return self._multi_conn

    @property
    def max_connections(self) -> int:
        """How many connections (workers) the reader pool may open to this export:
        1 unless the server advertises multi-conn (then ``MULTI_CONN_LIMIT``)."""
        return MULTI_CONN_LIMIT if self._multi_conn else 1

    @property
    def block_sizes(self) -> BlockSizes:
        return self._sizes

    @property
    def request_size(self) -> int:
        """Bytes per NBD read request (within the server's limits)."""
        return self._request_size

    @property
    def preferred_read_size(self) -> int:
        """A good granularity for callers (the server's preferred block size, >= 4 KiB)."""
        return max(4096, self._sizes.preferred or 0, self._min_block)

    def describe(self) -> dict[str, Any]:
        parts = urlsplit(self._spec.uri)
        return {
            "kind": self.kind,
            "uri": redact_uri(self._spec.uri),
            "export": unquote(parts.path[1:]) if parts.path.startswith("/") else "",
            "size": self._size,
            "bitmap": self._spec.bitmap,
            "multi_conn": self._multi_conn,
            "block_size": {
                "minimum": self._sizes.minimum,
                "preferred": self._sizes.preferred,
                "maximum": self._sizes.maximum,
            },
        }

    def spec(self) -> NbdSpec:
        """The recipe for another connection (this object's own stays open: a server
        without ``-t`` exits when its last client leaves; see ``spare_connections``)."""
        return self._spec

    def spare_connections(self, want: int, timeout_ms: int = PROBE_TIMEOUT_MS) -> int:
        """How many more clients, up to ``want``, the server accepts while this
        object's connection stays open. Probe connections are opened one by one and
        held (so each one counts against the server's limit) until one fails to finish
        its handshake within ``timeout_ms``, then all are closed. A server at its client
        limit (``qemu-nbd -e N`` with N clients) leaves the probe unanswered in its
        listen backlog: 0 means "read over this connection only"."""
        self._handle()  # ours first: the probes must not take the slot it needs
        probes: list[NbdHandle] = []
        try:
            while len(probes) < want:
                try:
                    probes.append(_connect(self._spec, timeout_ms))
                except SourceError:
                    break
            return len(probes)
        finally:
            for h in probes:
                with contextlib.suppress(NbdError):
                    h.shutdown()
                h.close()

    def clone(self) -> NbdSource:
        return self._spec.open()

    # -- extents -------------------------------------------------------------------------

    def extents(
        self, offset: int = 0, length: int | None = None, *, dirty: bool = False
    ) -> Iterator[Extent]:
        """Extents covering ``[offset, offset+length)`` in order, without gaps, adjacent
        equal extents merged. ``dirty=True`` reads the dirty bitmap the source was opened
        with (``SourceError`` without one)."""
        if length is None:
            length = self._size - offset
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"extent range {offset}+{length} outside the disk (size {self._size})")
        if dirty:
            if self._spec.bitmap is None:
                raise SourceError(
                    f"{redact_uri(self._spec.uri)}: no dirty bitmap given: "
                    "changed blocks are unknown (run a full backup)"
                )
            ctx = C.DIRTY_BITMAP_PREFIX + self._spec.bitmap
        else:
            ctx = C.CONTEXT_BASE_ALLOCATION
        return _coalesce(self._raw_extents(ctx, offset, length, dirty))

    def _raw_extents(self, ctx: str, offset: int, length: int, dirty: bool) -> Iterator[Extent]:
        end = offset + length
        if length == 0:
            return
        if not dirty and not self._has_alloc:
            # No allocation information: everything is data.
            yield Extent(offset, length, zero=False)
            return
        mb = self._min_block
        pos = offset
        while pos < end:
            start = pos - pos % mb
            count = min(BLOCK_STATUS_MAX, -(-(end - start) // mb) * mb, self._size - start)
            replies = self._block_status(count, start)
            entries = [r for r in replies if r[0] == ctx]
            if not entries:
                raise SourceError(
                    f"{redact_uri(self._spec.uri)}: the server sent no {ctx} block status "
                    f"for offset {start}"
                )
            _, cur, pairs = entries[0]
            before = pos
            if cur > pos:
                raise SourceError(
                    f"{redact_uri(self._spec.uri)}: block status for offset {start} "
                    f"started at {cur}"
                )
            for ln, flags in pairs:
                if ln == 0:
                    continue
                e_end = min(cur + ln, end)
                if e_end > pos:
                    if dirty:
                        yield Extent(pos, e_end - pos, zero=False, dirty=bool(flags & DIRTY))
                    else:
                        yield Extent(pos, e_end - pos, zero=bool(flags & C.STATE_ZERO))
                    pos = e_end
                cur += ln
                if pos >= end:
                    break
            if pos == before:
                raise SourceError(
                    f"{redact_uri(self._spec.uri)}: block status at offset {start} made no progress"
                )

    def _block_status(self, count: int, offset: int) -> list[BlockStatusReply]:
        try:
            return self._handle().block_status(count, offset)
        except NbdError as first:
            if not self._reconnect_for_retry(first):
                raise self._read_error("block status", offset, count, first) from None
            try:
                return self._handle().block_status(count, offset)
            except NbdError as e:
                raise self._read_error("block status", offset, count, e) from None

    # -- reads ---------------------------------------------------------------------------

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` with the bytes at ``offset``. A failed or short read
        raises ``SourceError`` (the buffer's contents are then undefined)."""
        n = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
        if offset < 0 or offset + n > self._size:
            raise ValueError(f"read {offset}+{n} outside the disk (size {self._size})")
        if n == 0:
            return
        try:
            self._read(buf, offset, n)
        except NbdError as first:
            if not self._reconnect_for_retry(first):
                raise self._read_error("read", offset, n, first) from None
            try:
                self._read(buf, offset, n)
            except NbdError as e:
                raise self._read_error("read", offset, n, e) from None

    def readinto_pieces(self, buf: memoryview, pieces: list[tuple[int, int, int]]) -> None:
        """Fill ``buf[pos:pos + n]`` with the disk bytes at ``offset`` for each
        ``(pos, offset, n)``, with several requests in flight (the reader pool's
        scattered chunks); the same checks and one reconnect-and-retry as ``readinto``."""
        mb = self._min_block
        for _pos, offset, n in pieces:
            if offset < 0 or offset + n > self._size:
                raise ValueError(f"read {offset}+{n} outside the disk (size {self._size})")
            end = offset + n
            if offset % mb or (end % mb and end != self._size):
                for p, o, k in pieces:  # unaligned edges: readinto's bounce buffers
                    self.readinto(buf[p : p + k], o)
                return
        for attempt in (0, 1):
            try:
                self._handle().pread_scatter(buf, pieces, self._request_size,
                                             self._spec.max_in_flight, self._timeout_ms)
                return
            except NbdError as e:
                off, n = (pieces[0][1], sum(k for _p, _o, k in pieces)) if pieces else (0, 0)
                if attempt or not self._reconnect_for_retry(e):
                    raise self._read_error("read", off, n, e) from None

    def _read(self, buf: Any, offset: int, n: int) -> None:
        h = self._handle()
        mb = self._min_block
        end = offset + n
        if offset % mb == 0 and (end % mb == 0 or end == self._size):
            h.pread_many(buf, offset, self._request_size, self._spec.max_in_flight,
                         self._timeout_ms)
            return
        # Unaligned edges (rare: only servers with a minimum block size > 1): read the
        # aligned cover into a bounce buffer and copy the asked part.
        a_start = offset - offset % mb
        a_end = min(-(-end // mb) * mb, self._size)
        bounce = bytearray(a_end - a_start)
        h.pread_many(bounce, a_start, self._request_size, self._spec.max_in_flight,
                     self._timeout_ms)
        memoryview(buf).cast("B")[:] = memoryview(bounce)[offset - a_start : end - a_start]

    # -- connection management -------------------------------------------------------------

    def _handle(self) -> NbdHandle:
        """The live connection, (re)opened on demand after ``release`` or a failure."""
        if self._closed:
            raise NbdError("the source is closed")
        h = self._h
        if h is None or h.closed:
            self._h = None
            h = self._h = self._open_handle()
        return h

    def _open_handle(self) -> NbdHandle:
        h = _connect(self._spec, self._connect_timeout_ms)
        if h.get_size() != self._size:
            size = h.get_size()
            h.close()
            raise SourceError(
                f"{redact_uri(self._spec.uri)}: the export changed size from {self._size} "
                f"to {size} bytes on reconnecting"
            )
        return h

    def release(self) -> None:
        """Drop this object's connection now; the next call opens a new one."""
        h, self._h = self._h, None
        if h is not None:
            try:
                h.shutdown()
            finally:
                h.close()

    def _reconnect_for_retry(self, error: NbdError) -> bool:
        """Drop the connection and connect again (once per failure) so the request can be
        retried; False when retries are off or the server cannot be reached again."""
        if self._retries <= 0 or self._closed:
            return False
        old, self._h = self._h, None
        if old is not None:
            old.close()
        try:
            self._h = self._open_handle()
        except SourceError:
            return False
        return True

    def _read_error(self, what: str, offset: int, n: int, e: NbdError) -> SourceError:
        return SourceError(
            _one_line(f"{redact_uri(self._spec.uri)}: {what} of {n} bytes at offset {offset} "
                      f"failed: {e.detail}")
        )

    def close(self) -> None:
        self._closed = True
        self.release()

    def __enter__(self) -> NbdSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NbdSource({redact_uri(self._spec.uri)!r}, size={self._size})"


def _connect(spec: NbdSpec, timeout_ms: int = CONNECT_TIMEOUT_MS) -> NbdHandle:
    shown = redact_uri(spec.uri)
    h = NbdHandle(f"snapferry-{os.getpid()}")
    try:
        h.set_request_structured_replies(True)
        h.set_pread_initialize(False)
        # The URI comes from the operator (CLI/config), so its TLS key files may be read.
        h.set_uri_allow_local_file(True)
        h.add_meta_context(C.CONTEXT_BASE_ALLOCATION)
        if spec.bitmap is not None:
            h.add_meta_context(C.DIRTY_BITMAP_PREFIX + spec.bitmap)
        try:
            h.connect_uri(spec.uri, timeout_ms)
        except NbdError as e:
            raise SourceError(
                _one_line(f"cannot connect to NBD server {shown}: {e.detail}")
            ) from None
        if spec.bitmap is not None and not (
            h.structured_replies_negotiated()
            and h.can_meta_context(C.DIRTY_BITMAP_PREFIX + spec.bitmap)
        ):
            raise SourceError(
                f"bitmap {spec.bitmap} not exported by the server: "
                "run a full backup (--mode full / without --bitmap)"
            )
        return h
    except BaseException:
        h.close()
        raise


def _coalesce(extents: Iterator[Extent]) -> Iterator[Extent]:
    cur: Extent | None = None
    for e in extents:
        if cur is not None and cur.end == e.offset and cur.zero == e.zero and cur.dirty == e.dirty:
            cur = Extent(cur.offset, cur.length + e.length, cur.zero, cur.dirty)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur
