"""A small cffi (ABI mode) binding of libnbd, the reference NBD client library.

Only the calls snapferry needs are declared (see ``snapferry.native._libnbd_cdef``); only the
runtime library ``libnbd.so.0`` (Debian ``libnbd0``) is needed, no headers, no compiler.

One ``NbdHandle`` is one NBD connection. It is not thread-safe in the sense that two
threads must not drive the same handle's asynchronous loop at once; use one handle per
worker (process or thread). Every libnbd failure raises ``NbdError`` (a ``SourceError``)
carrying libnbd's own message and errno.

Speed: ``pread_many`` keeps several ``nbd_aio_pread`` requests in flight into disjoint
slices of the caller's buffer (no copies); one synchronous request at a time leaves the
connection idle for a round trip per request.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from snapferry.engine.errors import SourceError
from snapferry.native import _libnbd_cdef as C

__all__ = [
    "BlockSizes",
    "BlockStatusReply",
    "NbdError",
    "NbdHandle",
    "available",
    "load",
]


class NbdError(SourceError):
    """libnbd reported a failure; ``errno`` is libnbd's errno (0 when unknown)."""

    def __init__(self, message: str, errno: int = 0, detail: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.detail = detail if detail is not None else message  # libnbd's own text


@dataclass(frozen=True, slots=True)
class BlockSizes:
    """The server's block-size constraints (NBD_INFO_BLOCK_SIZE); 0 = not advertised."""

    minimum: int
    preferred: int
    maximum: int


# One NBD_CMD_BLOCK_STATUS reply for one meta context: (context, offset, [(length, flags)])
BlockStatusReply = tuple[str, int, list[tuple[int, int]]]

_lock = threading.Lock()
_ffi: Any = None
_lib: Any = None
_extent_cb: Any = None


def load() -> tuple[Any, Any]:
    """Return ``(ffi, lib)``, loading ``libnbd.so.0`` on first use."""
    global _ffi, _lib, _extent_cb
    if _lib is not None:
        return _ffi, _lib
    with _lock:
        if _lib is None:
            ffi = _prebuilt_ffi() or _parsed_ffi()
            try:
                lib = ffi.dlopen(C.SONAME)
            except OSError as e:
                raise SourceError(
                    f"cannot load {C.SONAME} ({e}): install libnbd (Debian: apt install libnbd0)"
                ) from None
            _extent_cb = ffi.callback(
                "int(void *, const char *, uint64_t, uint32_t *, size_t, int *)",
                _on_extents,
            )
            _ffi = ffi
            _lib = lib
    return _ffi, _lib


def _prebuilt_ffi() -> Any:
    """The declarations parsed at install (``native/ffi_build.py``), or None when that
    module is missing, unloadable or made from other declarations than today's."""
    import importlib

    try:
        pre = importlib.import_module("snapferry.native._libnbd_ffi")
        from snapferry.native.ffi_build import cdef_digest
    except Exception:  # missing, or written by another cffi version
        return None
    return pre.ffi if getattr(pre, "CDEF_SHA256", None) == cdef_digest() else None


def _parsed_ffi() -> Any:
    try:
        import cffi
    except ImportError as e:  # pragma: no cover - cffi is a dependency
        raise SourceError(f"the cffi package is missing: {e}") from None
    ffi = cffi.FFI()
    ffi.cdef(C.CDEF)
    return ffi


def available() -> bool:
    """True when libnbd can be loaded on this machine."""
    try:
        load()
    except SourceError:
        return False
    return True


def _on_extents(
    user_data: Any, metacontext: Any, offset: int, entries: Any, nr_entries: int, error: Any
) -> int:
    """libnbd's extent callback: append ``(context, offset, [(length, flags), ...])``."""
    try:
        ffi = _ffi
        sink: list[BlockStatusReply] = ffi.from_handle(user_data)
        ctx = ffi.string(metacontext).decode("utf-8", "replace")
        flat = ffi.unpack(entries, nr_entries)
        pairs = [(flat[i], flat[i + 1]) for i in range(0, nr_entries - 1, 2)]
        sink.append((ctx, offset, pairs))
        return 0
    except Exception:  # never let an exception unwind through C
        error[0] = errno_mod.EPROTO
        return -1


def _last_error(what: str) -> NbdError:
    _, lib = load()
    raw = lib.nbd_get_error()
    text = _ffi.string(raw).decode("utf-8", "replace") if raw != _ffi.NULL else ""
    err = int(lib.nbd_get_errno())
    if not text:
        text = errno_mod.errorcode.get(err, "unknown error") if err else "unknown error"
    return NbdError(f"NBD {what} failed: {text}", err, text)


class NbdHandle:
    """One libnbd handle (one NBD connection). Use as a context manager or ``close()``."""

    def __init__(self, name: str | None = None) -> None:
        ffi, lib = load()
        self._ffi = ffi
        self._lib = lib
        h = lib.nbd_create()
        if h == ffi.NULL:
            raise _last_error("create")
        self._h: Any = h
        self._null_completion = ffi.new("nbd_completion_callback *")
        self._pid = os.getpid()
        if name:
            self._check(lib.nbd_set_handle_name(h, name.encode()), "set_handle_name")

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> NbdHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        return self._h is None

    def close(self) -> None:
        """Free the handle (closes the socket; requests still in flight are dropped)."""
        h, self._h = self._h, None
        if h is not None:
            self._lib.nbd_close(h)

    def _handle(self) -> Any:
        if self._h is None:
            raise NbdError("NBD connection is closed", errno_mod.ENOTCONN)
        return self._h

    def _check(self, rc: int, what: str) -> int:
        if rc == -1:
            raise _last_error(what)
        return int(rc)

    # -- configuration before connecting -----------------------------------------------

    def set_export_name(self, name: str) -> None:
        self._check(self._lib.nbd_set_export_name(self._handle(), name.encode()), "set_export_name")

    def add_meta_context(self, name: str) -> None:
        rc = self._lib.nbd_add_meta_context(self._handle(), name.encode())
        self._check(rc, "add_meta_context")

    def set_request_structured_replies(self, request: bool) -> None:
        self._check(
            self._lib.nbd_set_request_structured_replies(self._handle(), request),
            "set_request_structured_replies",
        )

    def set_pread_initialize(self, request: bool) -> None:
        """Whether libnbd zeroes read buffers first (libnbd still fails a read whose
        reply does not cover the whole request, so ``False`` is safe and saves a memset)."""
        self._check(
            self._lib.nbd_set_pread_initialize(self._handle(), request), "set_pread_initialize"
        )

    def set_uri_allow_local_file(self, allow: bool) -> None:
        """Let ``connect_uri`` read files the URI names (``tls-psk-file``)."""
        rc = self._lib.nbd_set_uri_allow_local_file(self._handle(), allow)
        self._check(rc, "set_uri_allow_local_file")

    def connect_uri(self, uri: str, timeout_ms: int | None = None) -> None:
        """Connect and negotiate. With ``timeout_ms``, give up (``ETIMEDOUT``, handle
        closed) when the handshake has not finished in time: a server at its client
        limit (``qemu-nbd -e N``) accepts the socket but never answers."""
        h = self._handle()
        if timeout_ms is None:
            self._check(self._lib.nbd_connect_uri(h, uri.encode()), "connect")
            return
        lib = self._lib
        self._check(lib.nbd_aio_connect_uri(h, uri.encode()), "connect")
        deadline = time.monotonic() + timeout_ms / 1000
        while self._check(lib.nbd_aio_is_connecting(h), "connect"):
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0 or self._check(lib.nbd_poll(h, left), "connect") == 0:
                self.close()
                raise NbdError(
                    f"NBD connect failed: no handshake from the server in {timeout_ms / 1000:g} s"
                    " (does it limit its clients, e.g. qemu-nbd -e?)",
                    errno_mod.ETIMEDOUT,
                    f"no handshake from the server in {timeout_ms / 1000:g} s "
                    "(does it limit its clients, e.g. qemu-nbd -e?)",
                )
        if not lib.nbd_aio_is_ready(h):
            raise _last_error("connect")

    def connect_unix(self, path: str) -> None:
        self._check(self._lib.nbd_connect_unix(self._handle(), path.encode()), "connect")

    def shutdown(self) -> None:
        """Polite NBD_CMD_DISC (the socket stays open until ``close``). A no-op in a
        forked child, which must not disconnect its parent's connection."""
        if self._h is not None and os.getpid() == self._pid:
            self._lib.nbd_shutdown(self._h, 0)

    # -- facts after connecting ------------------------------------------------------------

    def get_size(self) -> int:
        return self._check(self._lib.nbd_get_size(self._handle()), "get_size")

    def can_multi_conn(self) -> bool:
        return bool(self._check(self._lib.nbd_can_multi_conn(self._handle()), "can_multi_conn"))

    def can_meta_context(self, name: str) -> bool:
        rc = self._lib.nbd_can_meta_context(self._handle(), name.encode())
        return bool(self._check(rc, "can_meta_context"))

    def is_read_only(self) -> bool:
        return bool(self._check(self._lib.nbd_is_read_only(self._handle()), "is_read_only"))

    def structured_replies_negotiated(self) -> bool:
        rc = self._lib.nbd_get_structured_replies_negotiated(self._handle())
        return bool(self._check(rc, "get_structured_replies_negotiated"))

    def get_block_size(self, kind: int) -> int:
        """``kind`` is ``SIZE_MINIMUM``/``SIZE_PREFERRED``/``SIZE_MAXIMUM``; 0 = unknown."""
        return self._check(self._lib.nbd_get_block_size(self._handle(), kind), "get_block_size")

    def block_sizes(self) -> BlockSizes:
        return BlockSizes(
            self.get_block_size(C.SIZE_MINIMUM),
            self.get_block_size(C.SIZE_PREFERRED),
            self.get_block_size(C.SIZE_MAXIMUM),
        )

    # -- I/O ---------------------------------------------------------------------------

    def block_status(self, count: int, offset: int) -> list[BlockStatusReply]:
        """One NBD_CMD_BLOCK_STATUS: ``[(context, offset, [(length, flags), ...]), ...]``,
        one entry per negotiated meta context. A reply may describe less than ``count``
        bytes or run past it; callers loop (``snapferry.engine.sources.nbd`` does)."""
        sink: list[BlockStatusReply] = []
        keep = self._ffi.new_handle(sink)
        cb = self._ffi.new("nbd_extent_callback *")
        cb.callback = _extent_cb
        cb.user_data = keep
        self._check(
            self._lib.nbd_block_status(self._handle(), count, offset, cb[0], 0), "block status"
        )
        return sink

    def _cdata(self, buf: Any) -> Any:
        try:
            return self._ffi.from_buffer("char[]", buf, require_writable=True)
        except (TypeError, ValueError, BufferError) as e:
            raise NbdError(f"NBD read needs a writable contiguous buffer: {e}") from None

    def pread(self, buf: Any, offset: int) -> None:
        """Synchronous read of ``len(buf)`` bytes at ``offset`` straight into ``buf``."""
        cbuf = self._cdata(buf)
        n = len(cbuf)
        if n:
            self._check(self._lib.nbd_pread(self._handle(), cbuf, n, offset, 0), "read")

    def pread_many(
        self,
        buf: Any,
        offset: int,
        request_size: int,
        max_in_flight: int = 8,
        timeout_ms: int = 120_000,
    ) -> None:
        """Read ``len(buf)`` bytes at ``offset`` as requests of ``request_size`` bytes,
        keeping up to ``max_in_flight`` of them in flight, each into its own slice of
        ``buf``. On any failure the handle is closed (so no late reply can land in the
        caller's buffer) and ``NbdError`` is raised: the buffer's contents are then
        undefined and must not be used."""
        self.pread_ranges(buf, [(0, len(buf))], offset, request_size, max_in_flight, timeout_ms)

    def pread_ranges(
        self,
        buf: Any,
        ranges: Iterable[tuple[int, int]],
        base_offset: int,
        request_size: int,
        max_in_flight: int = 8,
        timeout_ms: int = 120_000,
    ) -> None:
        """Like ``pread_many`` for several ``(buf_pos, length)`` slices of ``buf``, slice
        ``buf_pos`` holding the disk bytes at ``base_offset + buf_pos``."""
        self.pread_scatter(buf, [(p, base_offset + p, n) for p, n in ranges], request_size,
                           max_in_flight, timeout_ms)

    def pread_scatter(
        self,
        buf: Any,
        pieces: Iterable[tuple[int, int, int]],
        request_size: int,
        max_in_flight: int = 8,
        timeout_ms: int = 120_000,
    ) -> None:
        """Like ``pread_ranges`` for ``(buf_pos, disk_offset, length)`` pieces: each
        slice of ``buf`` gets the disk bytes at its own offset (scattered chunks of an
        incremental, read with several requests in flight instead of one by one)."""
        if request_size <= 0 or max_in_flight <= 0:
            raise ValueError("request_size and max_in_flight must be positive")
        h = self._handle()
        lib = self._lib
        cbuf = self._cdata(buf)
        null = self._null_completion[0]
        todo = [(p, d, n) for p, d, n in pieces if n > 0]
        for p, _d, n in todo:
            if p < 0 or p + n > len(cbuf):
                raise ValueError("read range outside the buffer")
        inflight = 0
        pending = iter(_split(todo, request_size))
        nxt = next(pending, None)
        try:
            while nxt is not None or inflight:
                while nxt is not None and inflight < max_in_flight:
                    pos, disk, cnt = nxt
                    cookie = lib.nbd_aio_pread(h, cbuf + pos, cnt, disk, null, 0)
                    if cookie == -1:
                        raise _last_error("read")
                    inflight += 1
                    nxt = next(pending, None)
                # Retire whatever is complete; poll only when nothing is.
                retired = False
                while inflight:
                    cookie = lib.nbd_aio_peek_command_completed(h)
                    if cookie == -1:
                        raise _last_error("read")
                    if cookie == 0:
                        break
                    if lib.nbd_aio_command_completed(h, cookie) == -1:
                        raise _last_error("read")
                    inflight -= 1
                    retired = True
                if inflight and not retired:
                    rc = lib.nbd_poll(h, timeout_ms)
                    if rc == -1:
                        raise _last_error("read")
                    if rc == 0:
                        why = f"no reply from the server in {timeout_ms / 1000:g} s"
                        raise NbdError(f"NBD read failed: {why}", errno_mod.ETIMEDOUT, why)
        except BaseException:
            # Requests may still be in flight into ``buf``: drop the connection so that
            # nothing can be written there after we return.
            if inflight:
                self.close()
            raise


def _split(
    pieces: list[tuple[int, int, int]], request_size: int
) -> Iterable[tuple[int, int, int]]:
    for pos, disk, n in pieces:
        end = pos + n
        while pos < end:
            cnt = min(request_size, end - pos)
            yield pos, disk, cnt
            pos += cnt
            disk += cnt
