"""Progress reporting seam: the engine reports, the CLI draws (or stays quiet)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total_bytes: int) -> None:
        """A new phase begins (``total_bytes`` may be 0 when unknown)."""
        ...

    def advance(self, nbytes: int) -> None: ...

    def note(self, message: str) -> None:
        """A one-line status or warning for the user (stderr on a terminal)."""
        ...

    def finish(self) -> None: ...


class NullProgress:
    """Reports nothing (library use, ``--json``, tests)."""

    def start(self, label: str, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass
