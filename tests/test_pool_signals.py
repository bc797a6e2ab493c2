"""Reader workers must ignore Ctrl-C from their very first instruction: a SIGINT sent to
the process group while a worker is still importing (``spawn_main``) printed a
KeyboardInterrupt traceback (tests/test_cli_faults.py::test_interrupted_backup_rolls_back
failed so about 1 run in 13 under load). Blocking the signals in the parent did not help:
multiprocessing's spawn clears the blocked mask of the child; an ignored disposition
survives the exec."""

from __future__ import annotations

import multiprocessing as mp
import signal
from multiprocessing.connection import Connection

from snapferry.engine.pool import _ignoring_stop_signals


def _report(conn: Connection) -> None:
    # the first thing the child does: what did it inherit?
    conn.send((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
    conn.close()


def test_spawned_worker_starts_with_stop_signals_ignored() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    proc = ctx.Process(target=_report, args=(child,))
    with _ignoring_stop_signals():
        proc.start()
    child.close()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    got = parent.recv()
    proc.join(30)
    assert got == (signal.SIG_IGN, signal.SIG_IGN)


def test_without_it_the_child_takes_python_default_handler() -> None:
    """The control: a plain spawn gets Python's KeyboardInterrupt handler (so the test
    above would fail without the helper)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_report, args=(child,))
    proc.start()
    child.close()
    sigint, _ = parent.recv()
    proc.join(30)
    assert sigint is signal.default_int_handler
