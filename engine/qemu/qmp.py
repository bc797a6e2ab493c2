"""A small synchronous QMP client over ``qemu.qmp.legacy.QEMUMonitorProtocol``.

Every failure becomes a ``HypervisorError`` (``QmpCommandError`` carries QEMU's own
message, ``QmpConnectionError`` a lost or refused connection), so nothing from the
asyncio machinery underneath reaches the user as a traceback. Events are kept in a
backlog so waiting for one event never drops another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from snapferry.engine.errors import HypervisorError

Event = dict[str, Any]


class QmpCommandError(HypervisorError):
    """QEMU refused or failed a command; the message is QEMU's."""

    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"QEMU {command}: {desc}")
        self.command = command
        self.desc = desc


class QmpConnectionError(HypervisorError):
    """The QMP socket could not be reached, or the connection was lost."""


_CONN_ERRORS = (QMPError, OSError, EOFError, asyncio.TimeoutError, RuntimeError)


class Qmp:
    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._p: QEMUMonitorProtocol | None = None
        self._backlog: list[Event] = []

    @property
    def connected(self) -> bool:
        return self._p is not None

    def connect(self) -> None:
        if self._p is not None:
            return
        p = QEMUMonitorProtocol(self.socket_path)
        try:
            p.connect()
        except _CONN_ERRORS as e:
            self._drop(p)
            raise QmpConnectionError(f"cannot connect to QMP socket {self.socket_path}: {e}") from e
        p.settimeout(self.timeout)
        self._p = p
        self._backlog = []

    @staticmethod
    def _drop(p: QEMUMonitorProtocol) -> None:
        try:
            p.close()
        except Exception:
            pass

    def close(self) -> None:
        if self._p is not None:
            p, self._p = self._p, None
            self._drop(p)

    def reconnect(self) -> None:
        self.close()
        self.connect()

    def cmd(self, command: str, args: dict[str, Any] | None = None) -> Any:
        self.connect()
        assert self._p is not None
        try:
            return self._p.cmd(command, **(args or {}))
        except ExecuteError as e:
            raise QmpCommandError(command, str(e)) from e
        except _CONN_ERRORS as e:
            self.close()
            raise QmpConnectionError(
                f"QMP connection to {self.socket_path} lost during {command}: "
                f"{e or type(e).__name__}"
            ) from e

    def clear_events(self) -> None:
        if self._p is not None:
            self._p.clear_events()
        self._backlog = []

    def wait_event(self, match: Callable[[Event], bool], timeout: float) -> Event:
        """Wait for the first event (backlog first) for which ``match`` is true."""
        for i, ev in enumerate(self._backlog):
            if match(ev):
                return self._backlog.pop(i)
        self.connect()
        assert self._p is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HypervisorError(f"timed out after {timeout:.0f} s waiting for a QEMU event")
            try:
                got = self._p.pull_event(wait=float(left))
            except TimeoutError:
                continue
            except _CONN_ERRORS as e:
                self.close()
                raise QmpConnectionError(f"QMP connection lost while waiting: {e}") from e
            if got is None:
                continue
            ev = got
            if match(ev):
                return ev
            if ev.get("event") not in ("JOB_STATUS_CHANGE",):
                self._backlog.append(ev)
                del self._backlog[:-256]
