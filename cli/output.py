"""Output helpers shared by every command: JSON on stdout, tables and fields for people,
progress and notes on stderr, errors.

``emit_json(obj)`` prints ONE JSON object on stdout, wrapped in the envelope every
command shares (``schema_version``, ``command``, ``ok``: see docs/JSON.md);
``make_progress(json_mode)`` gives a tqdm bar on stderr only on a terminal (stdout and
stderr both ttys) and never under ``--json`` or ``-q``; ``fail(message)`` prints
``snapferry: <message>`` as one line on stderr. ``table`` and ``fields`` lay out
aligned text with sizes in the unit that fits each value.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.units import human_bytes

__all__ = [
    "SCHEMA_VERSION", "emit_error_json", "emit_json", "fail", "fields", "human_bytes",
    "make_progress", "print_fields", "table", "warn",
]

PROG = "snapferry"
SCHEMA_VERSION = 1
"""Version of the JSON documents (docs/JSON.md); raised when a key changes meaning or
goes away (new keys may appear without a change)."""


@dataclass
class _Context:
    command: str | None = None
    repository: str | None = None
    verbose: int = 0
    quiet: bool = False
    said: set[str] = field(default_factory=set)


_ctx = _Context()


def configure(
    *, command: str | None, repository: str | None = None, verbose: int = 0, quiet: bool = False
) -> None:
    """Set by ``main`` once the arguments are parsed: what the envelope says and how
    much goes to stderr."""
    global _ctx
    _ctx = _Context(command=command, repository=repository, verbose=verbose, quiet=quiet)


# -- JSON --------------------------------------------------------------------------------------


def _default(o: Any) -> Any:
    if hasattr(o, "to_json"):
        return o.to_json()
    if isinstance(o, bytes):
        return o.hex()
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    return str(o)


def envelope(obj: Mapping[str, Any], *, ok: bool = True) -> dict[str, Any]:
    """``obj`` with the keys every document shares first. ``seconds`` is made equal to
    ``phase_seconds.total`` where both exist (one clock for the whole command)."""
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": _ctx.command}
    body = dict(obj)
    doc["ok"] = bool(body.pop("ok", ok))
    if _ctx.repository is not None and "repository" not in body:
        doc["repository"] = _ctx.repository
    phases = body.get("phase_seconds")
    if isinstance(phases, dict) and isinstance(phases.get("total"), int | float):
        body["seconds"] = phases["total"]
    doc.update(body)
    return doc


def emit_json(obj: Mapping[str, Any], *, ok: bool = True) -> None:
    """Print ``obj`` (in the shared envelope) as one JSON document on stdout."""
    sys.stdout.write(json.dumps(envelope(obj, ok=ok), indent=2, default=_default) + "\n")
    sys.stdout.flush()


def emit_error_json(message: str, exit_code: int, kind: str) -> None:
    """The document a failed command prints on stdout under ``--json``."""
    emit_json(
        {"error": {"message": one_line(message), "exit_code": exit_code, "type": kind}},
        ok=False,
    )


# -- one-line messages -------------------------------------------------------------------------

_DOUBLED = re.compile(r"(\bdisk [^\s:]+: )(?:\1)+")


def one_line(message: str) -> str:
    """``message`` squeezed onto one line (errors must never span lines), with a prefix
    said twice in a row (``disk d1: disk d1: ...``) said once."""
    return _DOUBLED.sub(r"\1", " ".join(str(message).split()))


def fail(message: str, code: int = 1) -> int:
    """Print ``snapferry: <message>`` (one line) on stderr; return ``code``."""
    sys.stderr.write(f"{PROG}: {one_line(message)}\n")
    sys.stderr.flush()
    return code


def _note_key(message: str) -> str:
    text = one_line(message)
    return re.sub(r"^(warning|note): ", "", text, flags=re.IGNORECASE).strip().lower()


def first_time(message: str) -> bool:
    """True the first time a note or warning with this text is said in this run."""
    key = _note_key(message)
    if key in _ctx.said:
        return False
    _ctx.said.add(key)
    return True


def warn(message: str) -> None:
    if first_time(message):
        sys.stderr.write(f"{PROG}: {one_line(message)}\n")
        sys.stderr.flush()


# -- text layout -------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          right: Sequence[str] = ()) -> str:
    """Columns as wide as their widest cell, two spaces apart, nothing cut; the columns
    named in ``right`` (numbers, sizes) aligned right."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    last = len(headers) - 1

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if headers[i] in right:
                out.append(cell.rjust(widths[i]))
            elif i == last:
                out.append(cell)
            else:
                out.append(cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, Mapping):
        if not v:
            return "-"
        return "; ".join(f"{k}: {_value(x)}" for k, x in v.items())
    if isinstance(v, list | tuple | set | frozenset):
        return ", ".join(_value(x) for x in v) if v else "-"
    return str(v)


def fields(pairs: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> str:
    """``label  value`` lines with the values in one column; lists, mappings, None and
    booleans written as words, never as Python reprs."""
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    labels = [str(k).replace("_", " ") for k, _ in items]
    width = max((len(label) for label in labels), default=0)
    return "\n".join(
        f"{label:<{width}}  {_value(v)}".rstrip() for label, (_k, v) in zip(labels, items,
                                                                          strict=True)
    )


def print_fields(pairs: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> None:
    print(fields(pairs))


# -- progress ----------------------------------------------------------------------------------

CHUNK_PHASES = ("verify", "verify chunks")
"""Phases whose progress counts chunks, not bytes (the engine's labels)."""


def is_terminal() -> bool:
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class TtyProgress:
    """A tqdm bar per phase on stderr, in the unit the phase counts; notes above it."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, label: str, total_bytes: int) -> None:
        from tqdm import tqdm

        self.finish()
        chunks = label in CHUNK_PHASES
        self._bar = tqdm(
            total=total_bytes or None,
            desc=label,
            unit=" chunks" if chunks else "B",
            unit_scale=not chunks,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def note(self, message: str) -> None:
        if not first_time(message):
            return
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
    """No bar (not a terminal, or ``-q``); warnings still reach stderr, once each."""

    def note(self, message: str) -> None:
        if message.lower().startswith("warning"):
            warn(message)


class NotesProgress(NullProgress):
    """No bar, every note on stderr (``-v`` off a terminal)."""

    def note(self, message: str) -> None:
        warn(message)


def make_progress(json_mode: bool) -> Progress:
    """The progress reporter for a command: a bar on a terminal, silence otherwise
    (``-v``: notes anyway; ``-q``: warnings only)."""
    if json_mode:
        return NullProgress()
    if _ctx.quiet:
        return QuietProgress()
    if is_terminal():
        return TtyProgress()
    if _ctx.verbose:
        return NotesProgress()
    return QuietProgress()
