"""Output helpers shared by every command: JSON on stdout, progress on stderr, errors.

``emit_json(obj)`` prints ONE JSON object on stdout; ``make_progress(json_mode)`` gives a
tqdm bar on stderr only on a terminal (stdout and stderr both ttys) and never under
``--json``; ``fail(message)`` prints ``snapferry: <message>`` as one line on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from snapferry.engine.progress import NullProgress, Progress

PROG = "snapferry"


def _default(o: Any) -> Any:
    if hasattr(o, "to_json"):
        return o.to_json()
    if isinstance(o, bytes):
        return o.hex()
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    return str(o)


def emit_json(obj: Any) -> None:
    """Print ``obj`` as one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_default) + "\n")
    sys.stdout.flush()


def one_line(message: str) -> str:
    """``message`` squeezed onto one line (errors must never span lines)."""
    return " ".join(str(message).split())


def fail(message: str, code: int = 1) -> int:
    """Print ``snapferry: <message>`` (one line) on stderr; return ``code``."""
    sys.stderr.write(f"{PROG}: {one_line(message)}\n")
    sys.stderr.flush()
    return code


def warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: {one_line(message)}\n")
    sys.stderr.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_terminal() -> bool:
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class TtyProgress:
    """A tqdm bar per phase on stderr; notes printed above it."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, label: str, total_bytes: int) -> None:
        from tqdm import tqdm

        self.finish()
        self._bar = tqdm(
            total=total_bytes or None,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def note(self, message: str) -> None:
        line = f"{PROG}: {one_line(message)}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            sys.stderr.write(line + "\n")

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class QuietProgress(NullProgress):
    """No bar (not a terminal); warnings still reach stderr, one line each."""

    def note(self, message: str) -> None:
        if message.lower().startswith("warning"):
            warn(message)


def make_progress(json_mode: bool) -> Progress:
    """The progress reporter for a command: a bar on a terminal, silence otherwise."""
    if json_mode:
        return NullProgress()
    if is_terminal():
        return TtyProgress()
    return QuietProgress()
