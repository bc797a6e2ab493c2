"""nbdkit Python plugin: one disk of a restore point as a read-only NBD export.

nbdkit loads this file as a script (``nbdkit python script=THIS_FILE ...``) into its
embedded interpreter (Debian's /usr/bin/python3), not into snapferry's virtualenv. The
parameters, in this order on nbdkit's command line:

    sitedirs=DIR[:DIR...]   site-packages holding snapferry and its dependencies
                            (added with ``site.addsitedir``, so .pth files, i.e. an
                            editable install, work too)
    repo=PATH backup=ID disk=NAME
    cache=BYTES readahead=BYTES    (optional)
    model=serialize_requests|serialize_all_requests|parallel   (optional, see
                            thread_model; the other two for measurements)
    password_file=PATH      (optional) an encrypted repository's passphrase file
                            (else $SNAPFERRY_PASSWORD, inherited)
    logfd=N                 (optional) write our log lines to this inherited fd, not
                            stderr (nbdkit in the background has no stderr)
    lock=PURPOSE            (optional) hold the repository's shared lock role from
                            ``get_ready`` to ``cleanup``, in this process: an export
                            that outlives the process that started it (``instant``
                            killed) still keeps prune from deleting what it serves

``repo`` is a directory or an ``s3://BUCKET/PREFIX`` URL (endpoint and credentials come
from the environment nbdkit inherits, as for any snapferry process).

Connections run in parallel (zstd and the file reads release the GIL), each one's
requests one at a time (see ``thread_model``), on one shared ``RestorePointSource``, so
every connection shares one chunk cache and its read-ahead. The export is read-only,
so multi-conn is safe. ``extents`` reports zero chunks as holes (``HOLE|ZERO``) for
``base:allocation``. A chunk that fails its checks makes
the read fail with EIO and logs one line (once per chunk) on nbdkit's stderr.
"""

from __future__ import annotations

import errno
import site
import sys
import threading
from typing import Any

try:
    import nbdkit  # provided by nbdkit's python plugin at run time
except ImportError:  # imported outside nbdkit (tests, packaging): nothing to do
    nbdkit = None

API_VERSION = 2
READY_LINE = "ready (lock held)"  # not forwarded to the user (server.py)
MAX_EXTENTS = 4096  # per reply; clients ask again from where a reply ended

_params: dict[str, str] = {}
_source: Any = None
_lock: Any = None
_repo: Any = None
_reported: set[int] = set()
_report_lock = threading.Lock()


_logfile: Any = None


def _log(msg: str) -> None:
    out = _logfile if _logfile is not None else sys.stderr
    try:
        out.write(f"snapferry serve: {msg}\n")
        out.flush()
    except (OSError, ValueError):
        pass  # the process that read our lines is gone (an orphaned, detached export)


def thread_model() -> int:
    """``model=serialize_requests`` (the default): one request at a time per connection,
    connections in parallel. nbdkit 1.32 aborts (``raw_send_socket: Assertion
    `sock >= 0' failed``) when a client hangs up after a failed read while other
    requests of that connection are in flight under the parallel model (seen with
    nbdkit's own file plugin and error filter too), so ``parallel`` is opt-in."""
    model = _params.get("model", "serialize_requests")
    if model == "parallel":
        return int(nbdkit.THREAD_MODEL_PARALLEL)
    if model == "serialize_all_requests":
        return int(nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS)
    return int(nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS)


def config(key: str, value: str) -> None:
    if key == "sitedirs":
        # ahead of the system's dist-packages: Debian's own (older) boto3/botocore or
        # numpy must not shadow the versions snapferry was installed with
        before = list(sys.path)
        for d in value.split(":"):
            if d and d not in sys.path:
                site.addsitedir(d)
        sys.path[:] = [p for p in sys.path if p not in before] + before
    elif key == "logfd":
        global _logfile
        import os

        _logfile = os.fdopen(int(value), "w", buffering=1)
    elif key == "password_file":
        from snapferry.engine.store import keys

        keys.set_password_file(value)
    elif key in ("repo", "backup", "disk", "cache", "readahead", "model", "lock"):
        _params[key] = value
    else:
        raise ValueError(f"unknown parameter {key!r}")


def config_complete() -> None:
    for key in ("repo", "backup", "disk"):
        if key not in _params:
            raise ValueError(f"parameter {key}= is required")


def get_ready() -> None:
    """Open the restore point once, before any client connects."""
    global _source
    try:
        from snapferry.engine.sources.restore_point import RestorePointSource
        from snapferry.engine.store.repo import Repository
    except ImportError as e:
        _log(f"cannot import snapferry in nbdkit's Python {sys.version.split()[0]}: {e}")
        raise
    kw: dict[str, int] = {}
    if "cache" in _params:
        kw["cache_bytes"] = int(_params["cache"])
    if "readahead" in _params:
        kw["readahead_bytes"] = int(_params["readahead"])
    global _repo
    try:
        _repo = Repository.open(_params["repo"])
        _source = RestorePointSource.open(_repo, _params["backup"], _params["disk"], **kw)
    except Exception as e:
        _log(str(e))
        raise


def after_fork() -> None:
    """Take the lock here, not in ``get_ready``: in background mode nbdkit forks after
    ``get_ready`` and the lock must name the process that serves."""
    global _lock
    if "lock" not in _params:
        return
    import contextlib

    stack = contextlib.ExitStack()
    try:
        stack.enter_context(_repo.lock(_params["lock"]))
    except Exception as e:
        _log(str(e))
        raise
    _lock = stack
    _log(READY_LINE)  # the launcher waits for this line: the lock is held from here on


def cleanup() -> None:
    if _source is not None:
        _source.close()
    if _lock is not None:
        _lock.close()


def open(readonly: bool) -> int:
    return 1


def get_size(h: int) -> int:
    return int(_source.size)


def can_write(h: int) -> bool:
    return False


def can_multi_conn(h: int) -> bool:
    return True


def can_extents(h: int) -> bool:
    return True


def can_cache(h: int) -> int:
    return int(nbdkit.CACHE_EMULATE)


def is_rotational(h: int) -> bool:
    return False


def pread(h: int, buf: Any, offset: int, flags: int) -> None:
    from snapferry.engine.errors import SnapferryError

    try:
        _source.readinto(memoryview(buf), offset)
    except SnapferryError as e:
        key = hash(str(e))
        with _report_lock:
            first = key not in _reported
            _reported.add(key)
        if first:
            _log(f"read of {len(buf)} bytes at offset {offset} failed with EIO: {e}")
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "corrupt restore point data") from None


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    hole = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    out: list[tuple[int, int, int]] = []
    for e in _source.extents(offset, count):
        out.append((e.offset, e.length, hole if e.zero else 0))
        if len(out) >= MAX_EXTENTS or flags & nbdkit.FLAG_REQ_ONE:
            break
    return out
