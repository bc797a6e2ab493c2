"""The thaw watchdog: thaws the guest if the backup process dies (or stalls) while the
guest's filesystems are frozen.

The backend starts it right before ``guest-fsfreeze-freeze`` as a separate process in
its own session (a Ctrl-C to the backup's process group does not reach it), with a
pipe on its stdin whose write end only the backup process holds::

    backup process                      watchdog (this file, stdlib only)
    ──────────────                      ─────────────────────────────────
    spawn ──── pipe (stdin) ──────────▶ wait for a line, EOF or the limit
    freeze, snapshot, thaw
    write "done\\n", close  ──────────▶ "done": exit, touching nothing
    (killed: the kernel closes
     the pipe) ───────────── EOF ─────▶ thaw through the agent socket, exit
    (stalled past the limit) ─────────▶ thaw through the agent socket, exit

The freeze window is capped at ``limit`` seconds (VSS caps a freeze near 10 s): a
backup that stalls with the guest frozen gets a thaw from here, and its own thaw then
counts fewer filesystems than it froze, so that backup is judged not quiesced.

The agent's host socket takes one client at a time; the backup process does not hold
it during the freeze window, so the watchdog can always get in. Run as a script (by
path, ``python -I``), it imports nothing from snapferry: it starts in a few tens of
milliseconds and depends on nothing that a crash could have left half-done.

Usage: ``python -I thaw_watchdog.py AGENT_SOCKET LIMIT_SECONDS LOG``; when it thaws it
appends one line saying why and what it did to LOG (the backend reports it).
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import sys
import time


def _agent_call(sock: socket.socket, buf: bytearray, cmd: str, deadline: float) -> object:
    """Send ``cmd`` and return its ``return`` value (answers of earlier clients are
    skipped by the sync that precedes every call)."""
    sync = random.randrange(1, 2**31)
    sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                       "arguments": {"id": sync}}).encode() + b"\n")
    # skip everything up to the 0xff delimiter the agent sends before the sync answer
    while b"\xff" not in buf:
        _fill(sock, buf, deadline)
    del buf[: buf.index(b"\xff") + 1]
    while _read_msg(sock, buf, deadline).get("return") != sync:
        pass
    sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
    msg = _read_msg(sock, buf, deadline)
    if "error" in msg:
        raise OSError(f"{cmd}: {msg['error']}")
    return msg.get("return")


def _fill(sock: socket.socket, buf: bytearray, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("guest agent did not answer")
    sock.settimeout(left)
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("guest agent closed the connection")
    buf += data


def _read_msg(sock: socket.socket, buf: bytearray, deadline: float) -> dict[str, object]:
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line = bytes(buf[:nl]).strip().lstrip(b"\xff")
            del buf[: nl + 1]
            if line:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict):
                    return msg
            continue
        _fill(sock, buf, deadline)


def thaw(agent_socket: str, timeout: float = 30.0) -> str:
    """Thaw the guest if it is frozen; returns what was done (one line)."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.connect(agent_socket)
            buf = bytearray()
            if _agent_call(s, buf, "guest-fsfreeze-status", deadline) != "frozen":
                return "guest was not frozen"
            n = _agent_call(s, buf, "guest-fsfreeze-thaw", deadline)
            return f"thawed {n} filesystem(s)"
        except (OSError, ValueError) as e:
            last = str(e) or type(e).__name__
            time.sleep(0.2)
        finally:
            s.close()
    return f"could not thaw the guest: {last}"


def watch(agent_socket: str, limit: float, stdin_fd: int = 0) -> str | None:
    """Wait for "done" (return None), EOF or ``limit`` seconds (thaw; return why)."""
    deadline = time.monotonic() + limit
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            why = f"the guest stayed frozen {limit:g} s (freeze window limit)"
            break
        ready, _, _ = select.select([stdin_fd], [], [], left)
        if not ready:
            continue
        data = os.read(stdin_fd, 64)
        if not data:
            why = "the backup process went away while the guest was frozen"
            break
        got += data
        if b"done" in got:
            return None
    return f"{why}: {thaw(agent_socket)}"


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        sys.stderr.write("usage: thaw_watchdog.py AGENT_SOCKET LIMIT_SECONDS LOG\n")
        return 2
    outcome = watch(argv[1], float(argv[2]))
    if outcome is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            with open(argv[3], "a") as f:
                f.write(f"{stamp} pid {os.getpid()}: {outcome}\n")
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
