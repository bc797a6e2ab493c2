"""Named fault points for tests: the ONE place where test-only fault injection lives.

Production code marks a point with ``faults.fire("after-snapshot")`` (or asks
``faults.worker_faults()`` once per reader worker). With ``SNAPFERRY_FAULT`` unset —
always, outside the test suite — a point is one dictionary lookup in ``os.environ``
and does nothing.

``SNAPFERRY_FAULT`` holds comma-separated ``POINT=ACTION`` entries::

    SNAPFERRY_FAULT=after-export=sigkill
    SNAPFERRY_FAULT=worker-kill=6
    SNAPFERRY_FAULT=worker-stall=4@/tmp/stalled

Points and their actions:

==========================  ===============================================================
``after-<phase>``            the coordinator finished lifecycle step ``<phase>`` (one of
                             ``PHASES``, or ``commit``: manifest written, ``finalize``
                             not yet run); action ``sigint`` / ``sigterm`` / ``sigkill``
                             sends that signal to the backup process, ``raise`` raises a
                             ``HypervisorError``
``worker-kill=N``            a reader worker SIGKILLs itself before its read after N chunks
``worker-stall=N@PATH``      a reader worker appends its pid to PATH and sleeps forever
                             after N chunks (to deliver Ctrl-C / SIGKILL mid-copy)
``pack-rot=N``               the N-th pack (from 1) a reader worker saves gets one byte
                             flipped right after its save, before the worker reads it
                             back (storage that does not return what was written)
``prune-kill=STEP[:N]``      prune SIGKILLs itself the N-th time (default 1) it reaches
                             ``STEP`` (one of ``engine.store.prune.STEPS``)
==========================  ===============================================================

An unknown point or action is an error (a typo must not make a fault test pass
vacuously).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Protocol

from snapferry.engine.errors import HypervisorError

FAULT_ENV = "SNAPFERRY_FAULT"
PHASES = ("quiesce", "snapshot", "thaw", "export", "copy", "verify", "merge")
# after-commit: the restore point is committed, the hypervisor's bookkeeping
# (finalize) not yet done; not a lifecycle step that cleanup alone can undo
POINTS = (*(f"after-{p}" for p in PHASES), "after-commit", "worker-kill", "worker-stall",
          "prune-kill")
PHASE_ACTIONS = ("sigint", "sigterm", "sigkill", "raise")

POINTS += ("pack-rot",)  # a reader worker's pack saver (engine/store/saver.py)


def _parse(spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        point, sep, action = entry.partition("=")
        if not sep or point not in POINTS:
            raise ValueError(f"{FAULT_ENV}: unknown fault point in {entry!r} "
                             f"(known: {', '.join(POINTS)})")
        if point.startswith("after-") and action not in PHASE_ACTIONS:
            raise ValueError(f"{FAULT_ENV}: {point} takes one of {', '.join(PHASE_ACTIONS)}")
        out[point] = action
    return out


def _active() -> dict[str, str]:
    spec = os.environ.get(FAULT_ENV)
    return _parse(spec) if spec else {}


def spec(**points: str) -> str:
    """The ``SNAPFERRY_FAULT`` value for ``points`` (``after_copy="sigkill"`` and so on),
    checked: for tests to build their environment with."""
    text = ",".join(f"{k.replace('_', '-')}={v}" for k, v in points.items())
    _parse(text)
    return text


def fire(point: str) -> None:
    """Act on ``point`` if the test environment asks for it; else nothing."""
    if FAULT_ENV not in os.environ:
        return
    action = _active().get(point)
    if action is None:
        return
    if action == "raise":
        raise HypervisorError(f"test fault injected at {point}")
    sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[action]
    os.kill(os.getpid(), sig)
    if sig == signal.SIGKILL:  # pragma: no cover - never returns
        time.sleep(60)


@dataclass(frozen=True)
class WorkerFaults:
    """What one reader worker was asked to do (read once when the worker starts)."""

    kill_after: int | None = None
    stall_after: int | None = None
    stall_file: str | None = None

    @property
    def any(self) -> bool:
        return self.kill_after is not None or self.stall_after is not None

    def check(self, done_chunks: int) -> None:
        """Called before each read with the chunks done so far."""
        if self.kill_after is not None and done_chunks >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.stall_after is not None and done_chunks >= self.stall_after:
            if self.stall_file:
                with open(self.stall_file, "a") as f:
                    f.write(f"{os.getpid()}\n")
            while True:
                time.sleep(3600)


def worker_faults() -> WorkerFaults:
    """The worker-side points, parsed once; ``WorkerFaults()`` (inactive) when unset."""
    if FAULT_ENV not in os.environ:
        return WorkerFaults()
    act = _active()
    kill = act.get("worker-kill")
    stall, _, path = act.get("worker-stall", "").partition("@")
    return WorkerFaults(kill_after=int(kill) if kill else None,
                        stall_after=int(stall) if stall else None,
                        stall_file=path or None)


class _Objects(Protocol):
    def save(self, kind: str, name: str, data: bytes, *, if_absent: bool = True) -> bool: ...


_packs_saved = [0]


def pack_saved(backend: _Objects, name: str, data: bytes | bytearray) -> None:
    """``pack-rot=N``: the N-th pack this process saved (``data``) is replaced by a copy
    with the byte in its middle flipped."""
    if FAULT_ENV not in os.environ:
        return
    want = _active().get("pack-rot")
    if not want:
        return
    _packs_saved[0] += 1
    if _packs_saved[0] == int(want):
        raw = bytearray(data)
        raw[len(raw) // 2] ^= 0x01
        backend.save("data", name, bytes(raw), if_absent=False)


def prune_kill() -> tuple[str, int] | None:
    """``(STEP, N)`` when ``prune-kill`` is set, else None."""
    if FAULT_ENV not in os.environ:
        return None
    value = _active().get("prune-kill")
    if not value:
        return None
    step, _, n = value.partition(":")
    return step, int(n) if n.isdigit() else 1
