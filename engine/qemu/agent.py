"""A small synchronous client of qemu-guest-agent (JSON lines over the host socket).

The host side of the agent's virtio-serial port is a QEMU chardev socket that accepts
ONE client at a time, so callers connect, do their work and close again (the backend
does not hold the agent across the copy). Every connection starts with a 0xFF byte
(resets the agent's JSON parser after a half-sent command of an earlier client) and
``guest-sync-delimited`` with a random id; answers left over from an earlier client are
skipped until the sync id comes back.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from typing import Any

from snapferry.engine.errors import HypervisorError


class AgentError(HypervisorError):
    """The guest agent answered with an error (``desc`` is the agent's message)."""


class AgentTimeout(AgentError):
    """The guest agent did not answer in time (or its socket is not there)."""


class GuestAgent:
    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    # -- connection ---------------------------------------------------------------
    def connect(self, timeout: float | None = None) -> None:
        """Connect and synchronise (``guest-sync-delimited``); raises AgentTimeout."""
        if self._sock is not None:
            return
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(limit)
        try:
            s.connect(self.socket_path)
        except OSError as e:
            s.close()
            raise AgentTimeout(f"guest agent socket {self.socket_path}: {e.strerror or e}") from e
        self._sock = s
        self._buf = b""
        try:
            sync_id = random.randrange(1, 2**31)
            self._send(b"\xff" + self._encode("guest-sync-delimited", {"id": sync_id}))
            self._read_until_delimiter(deadline)
            while True:
                msg = self._read_json(deadline)
                if msg.get("return") == sync_id:
                    return
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buf = b""

    def __enter__(self) -> GuestAgent:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- wire ---------------------------------------------------------------------
    @staticmethod
    def _encode(cmd: str, args: dict[str, Any] | None) -> bytes:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        return json.dumps(msg).encode() + b"\n"

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as e:
            self.close()
            raise AgentTimeout(f"guest agent connection lost: {e}") from e

    def _fill(self, deadline: float) -> None:
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeout("guest agent did not answer in time")
        self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError as e:
            raise AgentTimeout("guest agent did not answer in time") from e
        except OSError as e:
            raise AgentTimeout(f"guest agent connection lost: {e}") from e
        if not chunk:
            raise AgentTimeout("guest agent closed the connection")
        self._buf += chunk

    def _read_until_delimiter(self, deadline: float) -> None:
        while b"\xff" not in self._buf:
            self._buf = b""
            self._fill(deadline)
        self._buf = self._buf[self._buf.index(b"\xff") + 1 :]

    def _read_json(self, deadline: float) -> dict[str, Any]:
        while True:
            while b"\n" not in self._buf:
                self._fill(deadline)
            line, self._buf = self._buf.split(b"\n", 1)
            line = line.strip().lstrip(b"\xff")
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # garbage from an interrupted earlier exchange
            if isinstance(msg, dict):
                return msg

    # -- commands -----------------------------------------------------------------
    def call(self, cmd: str, args: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        """Run one agent command; returns its ``return`` value."""
        self.connect(timeout)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._send(self._encode(cmd, args))
        try:
            msg = self._read_json(deadline)
        except AgentTimeout:
            self.close()  # a late answer must not be taken for the next command's
            raise
        if "error" in msg:
            err = msg["error"]
            desc = err.get("desc", str(err)) if isinstance(err, dict) else str(err)
            raise AgentError(f"{cmd}: {desc}")
        return msg.get("return")

    def ping(self, timeout: float | None = None) -> None:
        self.call("guest-ping", timeout=timeout)

    def fsfreeze_status(self, timeout: float | None = None) -> str:
        return str(self.call("guest-fsfreeze-status", timeout=timeout))

    def fsfreeze_freeze(self, timeout: float | None = None) -> int:
        return int(self.call("guest-fsfreeze-freeze", timeout=timeout))

    def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        return int(self.call("guest-fsfreeze-thaw", timeout=timeout))

    def file_write(self, path: str, data: bytes, mode: str = "w") -> None:
        handle = self.call("guest-file-open", {"path": path, "mode": mode})
        try:
            step = 48 * 1024
            for i in range(0, len(data), step) or [0]:
                part = data[i : i + step]
                self.call("guest-file-write", {"handle": handle,
                                               "buf-b64": base64.b64encode(part).decode()})
            self.call("guest-file-flush", {"handle": handle})
        finally:
            self.call("guest-file-close", {"handle": handle})

    def file_read(self, path: str) -> bytes:
        handle = self.call("guest-file-open", {"path": path, "mode": "r"})
        out = bytearray()
        try:
            while True:
                r = self.call("guest-file-read", {"handle": handle, "count": 48 * 1024})
                out += base64.b64decode(r.get("buf-b64", ""))
                if r.get("eof") or not r.get("count"):
                    break
        finally:
            self.call("guest-file-close", {"handle": handle})
        return bytes(out)

    def exec_wait(self, path: str, args: list[str] | None = None,
                  timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """Run a program in the guest and wait for it: (exit code, stdout, stderr)."""
        r = self.call("guest-exec", {"path": path, "arg": args or [], "capture-output": True})
        pid = r["pid"]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            st = self.call("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return (
                    int(st.get("exitcode", -1)),
                    base64.b64decode(st.get("out-data", "")),
                    base64.b64decode(st.get("err-data", "")),
                )
            if time.monotonic() > deadline:
                raise AgentTimeout(f"guest command {path} did not finish in time")
            time.sleep(0.05)
