"""Exceptions that reach the user as one clear line.

Everything the engine raises on purpose derives from ``SnapferryError``; the CLI prints
``snapferry: <message>`` and exits with ``exit_code``. Anything else is a bug.
"""

from __future__ import annotations


class SnapferryError(Exception):
    """A failure with a message meant for the user."""

    exit_code = 1


class UsageError(SnapferryError):
    """Bad arguments or input given by the user."""

    exit_code = 2


class RepositoryError(SnapferryError):
    """The repository is missing, of another format, locked or damaged."""


class CorruptionError(RepositoryError):
    """Stored data failed a checksum, digest or structure check."""


class SourceError(SnapferryError):
    """A disk source could not be opened or read."""


class HypervisorError(SnapferryError):
    """The hypervisor refused or failed a lifecycle step."""


class QuiesceError(HypervisorError):
    """The guest could not be frozen, or the freeze could not be proven."""


class BackupAborted(SnapferryError):
    """The backup was interrupted (signal) and rolled back."""

    exit_code = 130
