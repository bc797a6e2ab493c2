"""What every command module shares: the parser class and help layout, the global
options, size parsing, opening the repository, exit codes and environment variables.

Command modules import this module and ``output``; nothing here imports a command
module (``main`` is the only module that knows them all).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from snapferry.engine.errors import UsageError
from snapferry.engine.location import RepoLocation, parse_location

if TYPE_CHECKING:
    from snapferry.engine.store.repo import Repository

PROG = "snapferry"
REPO_ENV = "SNAPFERRY_REPO"
DEBUG_ENV = "SNAPFERRY_DEBUG"
S3_ENDPOINT_ENV = "SNAPFERRY_S3_ENDPOINT"
DEFAULT_AUDIT_PERCENT = 1.0  # = engine/planning.DEFAULT_AUDIT_PERCENT (not imported: fast --help)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_BUG = 70
EXIT_INTERRUPTED = 130

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILURE, "the command failed (source, hypervisor or repository error, or verify "
                   "found damage); the message on stderr says why"),
    (EXIT_USAGE, "bad arguments or input (unknown option, missing repository, target "
                 "exists or is in use, ambiguous restore point id)"),
    (EXIT_NOT_RUNNING, "lab status: the lab VM is not running"),
    (EXIT_BUG, "internal error (a bug: please report it; SNAPFERRY_DEBUG=1 prints the "
               "traceback)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C or SIGTERM); a backup in progress was rolled "
                       "back and the VM left running on its base disk"),
)

ENVIRONMENT: tuple[tuple[str, str], ...] = (
    (REPO_ENV, "the repository when --repo is not given"),
    ("SNAPFERRY_VSPHERE_PASSWORD", "the vSphere password (else it is asked for on a "
                                   "terminal)"),
    (DEBUG_ENV, "1: print the traceback of an error as well as its one-line message"),
    ("SNAPFERRY_WORK_DIR", "where QEMU backups keep their temporary overlays and recovery "
                           "state (default ~/.cache/snapferry/work)"),
    ("SNAPFERRY_LAB_DIR", "the lab VM's folder: disks, sockets, pid file (default "
                          "~/.cache/snapferry/lab)"),
    ("SNAPFERRY_ACCEL", "the lab VM's accelerator: tcg (default), kvm, or auto (kvm when "
                        "/dev/kvm works)"),
    ("SNAPFERRY_LAB_KERNEL", "the kernel version the lab VM boots (default: the newest "
                             "/boot/vmlinuz-* with modules)"),
    ("SNAPFERRY_LAB_BOOT_TIMEOUT", "seconds to wait for the lab VM's guest agent (default "
                                   "120)"),
)
"""Every SNAPFERRY_* variable a user may set (tests have their own, documented in
tests/; they are not part of the interface)."""

EXIT_EPILOG = "exit status:\n" + "\n".join(
    textwrap.fill(what, 88, initial_indent=f"  {c:<5}", subsequent_indent=" " * 7)
    for c, what in EXIT_CODES
)
ENV_EPILOG = "environment:\n" + "\n".join(
    f"  {k}\n" + textwrap.fill(what, 88, initial_indent=" " * 6, subsequent_indent=" " * 6)
    for k, what in ENVIRONMENT
)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``256K``, ``1M``, ``1MiB``, ``4m``, ``65536`` → bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256K, 1M, 1MiB, 65536)")
    num, unit = int(m.group(1)), m.group(2).lower()
    return num << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]


def non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {n}")
    return n


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples keep their lines); every option
    with a default that says something shows it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=92)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or action.option_strings == []
            or isinstance(action, argparse._CountAction | argparse._VersionAction)
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line) instead of printing usage, and
    lays help out with ``HelpFormatter``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


# -- global options ------------------------------------------------------------------------
# Accepted before the command (restic and borg users write them there) and after it.
# Before: stored under GLOBAL_PREFIX names on the top-level parser; after: the usual
# names on the command's parser; ``merge_globals`` folds the two.

GLOBAL_PREFIX = "global_"


def add_global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """``--repo``, ``--json``, ``-v``, ``-q`` on ``p`` (skipping any ``p`` already has)."""
    pre = GLOBAL_PREFIX if top else ""
    have = set(p._option_string_actions)
    g = p.add_argument_group("global options") if not top else p
    if "--repo" not in have:
        g.add_argument("--repo", dest=pre + "repo", metavar="REPO", default=None,
                       help="the repository: a directory or s3://BUCKET/PREFIX "
                            f"(default: ${REPO_ENV})")
    if "--json" not in have:
        g.add_argument("--json", dest=pre + "json", action="store_true",
                       help="print one JSON object on stdout (docs/JSON.md), no progress")
    if "-v" not in have and "--verbose" not in have:
        g.add_argument("-v", "--verbose", dest=pre + "verbose", action="count", default=0,
                       help="say more on stderr: every status note; twice: tracebacks too")
    if "-q" not in have and "--quiet" not in have:
        g.add_argument("-q", "--quiet", dest=pre + "quiet", action="store_true",
                       help="no progress bar and no notes; errors and warnings still show")
    if "--password-file" not in have:
        g.add_argument("--password-file", dest=pre + "password_file", metavar="FILE",
                       default=None,
                       help="encrypted repositories: read the passphrase from FILE (default: "
                            "$SNAPFERRY_PASSWORD, else a prompt on a terminal)")
    if "--s3-endpoint" not in have:
        g.add_argument("--s3-endpoint", dest=pre + "s3_endpoint", metavar="URL", default=None,
                       help="S3 service for s3://BUCKET/PREFIX repositories (Ceph RGW, "
                            f"MinIO; default: ${S3_ENDPOINT_ENV}, else AWS)")


def merge_globals(args: argparse.Namespace) -> argparse.Namespace:
    """Fold the options given before the command into those given after it."""
    for name in ("repo", "json", "verbose", "quiet", "s3_endpoint", "password_file"):
        before = getattr(args, GLOBAL_PREFIX + name, None)
        after = getattr(args, name, None)
        if name == "verbose":
            value: object = int(before or 0) + int(after or 0)
        elif name in ("repo", "s3_endpoint", "password_file"):
            value = after if after is not None else before
        else:
            value = bool(before) or bool(after)
        setattr(args, name, value)
        if hasattr(args, GLOBAL_PREFIX + name):
            delattr(args, GLOBAL_PREFIX + name)
    return args


# -- repository ------------------------------------------------------------------------------


def repo_location(args: argparse.Namespace) -> RepoLocation:
    """The repository given with ``--repo`` or ``$SNAPFERRY_REPO``, parsed."""
    path: str | None = getattr(args, "repo", None) or os.environ.get(REPO_ENV)
    if not path:
        raise UsageError(f"no repository given: use --repo REPO or set {REPO_ENV}")
    return parse_location(path)


def repo_path(args: argparse.Namespace) -> str:
    return str(repo_location(args))


def derive_key_ahead(args: argparse.Namespace) -> None:
    """Start the passphrase's scrypt of an encrypted directory repository in a thread
    (``engine/kdf.py``), so that it runs while the store's modules load; a command calls
    this before its heavy imports (``open_repo`` does too). Never raises."""
    from snapferry.engine import kdf

    try:
        loc = repo_location(args)
    except UsageError:
        return
    kdf.derive_ahead(str(loc.target), getattr(args, "password_file", None))


def open_repo(args: argparse.Namespace) -> Repository:
    derive_key_ahead(args)
    from snapferry.engine.store import keys
    from snapferry.engine.store.repo import Repository

    keys.set_password_file(getattr(args, "password_file", None))
    return Repository.open(repo_location(args).target)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt) while a command runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def epilog(examples: str, *more: str) -> str:
    """A command's epilog: its examples, then any further sections."""
    parts = ["examples:\n" + examples.strip("\n")]
    parts.extend(m.strip("\n") for m in more)
    return "\n\n".join(parts)


def parse_percent(text: str) -> float:
    """``1``, ``0.5``, ``5%`` → a percentage in [0, 100]."""
    try:
        v = float(text.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a percentage: {text!r} (e.g. 1, 0.5, 5%)"
        ) from None
    if not 0 <= v <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 100")
    return v
