"""Is a process of this host still the one we knew? (lock holders, watchdogs, daemons)

``/proc/PID/stat`` is the process table, not repository data. A zombie counts as gone,
and so does a pid that now belongs to a process with another start time (reused pid).
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` (field 22 of /proc/PID/stat); None if it is gone or a
    zombie. Recorded beside a pid, it tells the process from a later one with its pid."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return None
    return None if fields is None or fields[0] == "Z" else fields[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """``pid`` runs on this host (not a zombie) and, when ``start`` is given, is the
    process that had that start time."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        fields = _stat_fields(pid)
    except OSError:
        return True  # exists, but its stat cannot be read here: assume it runs
    if fields is None or fields[0] == "Z":
        return False
    return start is None or fields[19] == start
