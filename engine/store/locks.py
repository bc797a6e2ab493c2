"""Lock objects (``locks/shared-…``, ``locks/exclusive-…``): docs/FORMAT.md, *Locks*.

Writers (backups) hold the shared role, many at once; deleters (prune) the exclusive
role, alone. Taking a role = create the own lock object, then list the others: a
conflicting live lock makes the taker remove its own and fail. Two racing takers both
see each other, so at least one backs off (never both proceed).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from snapferry.engine.errors import RepositoryError
from snapferry.engine.procs import process_alive, process_start
from snapferry.engine.store.backend import Backend, ObjectMissing

Role = Literal["shared", "exclusive"]
OTHER_HOST_STALE_S = 24 * 3600
"""Another host's lock is live until this long after its last refresh (or its start)."""
REFRESH_S = 10 * 60
"""A holder rewrites its lock object this often (``refreshed``), however long it runs."""
UNREADABLE_GRACE_S = 30




def _since_s(since: Any) -> float | None:
    if not isinstance(since, str):
        return None
    try:
        t = datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return time.time() - t.timestamp()


def is_stale(held: dict[str, Any], size: int) -> bool:
    """A lock whose holder is provably gone (see the module doc and FORMAT.md)."""
    if not held:
        return False  # unreadable: decided by the caller with the grace time
    pid = held.get("pid")
    if held.get("host") == socket.gethostname():
        return isinstance(pid, int) and not process_alive(pid, held.get("pid_start"))
    ages = [a for a in (_since_s(held.get("since")), _since_s(held.get("refreshed")))
            if a is not None]
    return bool(ages) and min(ages) > OTHER_HOST_STALE_S


def read_lock(backend: Backend, name: str) -> dict[str, Any] | None:
    try:
        raw = backend.load("locks", name)
    except ObjectMissing:
        return None
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


class _Unwritable(RepositoryError):
    """The lock object could not be written (a reader goes on without one)."""


def _take(backend: Backend, role: Role, purpose: str) -> tuple[str, dict[str, Any]]:
    """Write this process's lock object of ``role``; its name and content."""
    me: dict[str, Any] = {
        "role": role,
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "host": socket.gethostname(),
        "purpose": purpose,
        "since": _now(),
        "token": secrets.token_hex(8),
    }
    name = f"{role}-{secrets.token_hex(8)}"
    try:
        backend.save("locks", name, json.dumps(me).encode())
    except RepositoryError as e:
        raise _Unwritable(str(e)) from None
    return name, me


class _Refresher:
    """Rewrites a held lock object every ``REFRESH_S`` with the time in ``refreshed``, so
    that another host never takes a long job's lock for stale (a daemon thread; stops
    when the lock is given back, or when the object is gone: removed as stale, it is
    not brought back)."""

    def __init__(self, backend: Backend, name: str, me: dict[str, Any]) -> None:
        self.backend, self.name, self.me = backend, name, me
        self.stop = threading.Event()
        self.refreshes = 0
        self.thread = threading.Thread(target=self._run, name=f"lock-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(REFRESH_S):
            try:
                if self.backend.stat("locks", self.name) is None:
                    return
                body = dict(self.me, refreshed=_now())
                self.backend.save("locks", self.name, json.dumps(body).encode(),
                                  if_absent=False)
                self.refreshes += 1
            except RepositoryError:
                continue  # the next round tries again

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _give_back(backend: Backend, name: str) -> None:
    with contextlib.suppress(RepositoryError):
        backend.remove("locks", name)


@contextlib.contextmanager
def _holding(backend: Backend, taken: tuple[str, dict[str, Any]], role: Role,
             where: str) -> Iterator[str]:
    name, me = taken
    try:
        _check_others(backend, role, name, where)
    except BaseException:
        _give_back(backend, name)
        raise
    refresher = _Refresher(backend, name, me)
    try:
        yield name
    finally:
        refresher.close()
        _give_back(backend, name)


@contextlib.contextmanager
def hold(backend: Backend, role: Role, purpose: str, where: str) -> Iterator[str]:
    """Hold ``role`` on the repository for the ``with`` block (refreshed while held);
    yields the lock's name."""
    with _holding(backend, _take(backend, role, purpose), role, where) as name:
        yield name


@contextlib.contextmanager
def reading(backend: Backend, purpose: str, where: str,
            warn: Callable[[str], None]) -> Iterator[str | None]:
    """The shared role for a reader (restore, verify): FORMAT.md rule D8. As ``hold``,
    but a repository this process cannot write a lock object into (a read-only
    filesystem or mount, no write permission, a read-only S3 key) is read without one,
    after one ``warn``; a live exclusive lock refuses the read either way."""
    why = ""
    try:
        taken = _take(backend, "shared", purpose)
    except _Unwritable as e:
        why = str(e)
    if why:
        warn(f"reading without a lock ({why}): a prune started meanwhile could make this "
             "read fail (it never returns wrong data)")
        _check_others(backend, "shared", "", where, tidy=False)
        yield None
        return
    with _holding(backend, taken, "shared", where) as name:
        yield name


def _check_others(backend: Backend, role: Role, mine: str, where: str, *,
                  tidy: bool = True) -> None:
    """Refuse when another live lock conflicts with ``role``; stale ones are removed
    (with ``tidy``) or passed over."""
    for info in list(backend.objects("locks")):
        if info.name == mine:
            continue
        other_role = info.name.split("-", 1)[0]
        if role == "shared" and other_role != "exclusive":
            continue
        held = read_lock(backend, info.name)
        if held is None:
            continue  # removed meanwhile
        if is_stale(held, info.size):
            if tidy:
                backend.remove("locks", info.name)
            continue
        if not held:
            # unreadable (a crash between create and write cannot happen with
            # create-if-absent of the whole object, but a foreign file can): live a while
            continue
        what = held.get("purpose", "another job")
        raise RepositoryError(
            f"repository {where} is locked by {what} ({held.get('role', other_role)} lock, "
            f"pid {held.get('pid')} on {held.get('host')}, since {held.get('since')}); "
            f"if that process is gone, remove locks/{info.name}"
        )


def live_locks(backend: Backend) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for info in backend.objects("locks"):
        held = read_lock(backend, info.name)
        if held is not None and not is_stale(held, info.size):
            out.append((info.name, held))
    return out
