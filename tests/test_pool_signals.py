"""Reader workers must not take Ctrl-C before their ``worker_main`` ignores it: a SIGINT
sent to the process group while a worker is still importing (``spawn_main``) printed a
KeyboardInterrupt traceback (tests/test_cli_faults.py::test_interrupted_backup_rolls_back
failed so about 1 run in 13 under load). A blocked mask does not reach a spawned child;
an ignored disposition survives the exec, so the worker execs with SIGINT ignored.

And the parent must neither run its handler inside ``Process.start`` (a child cut off
before its preparation data printed EOFError) nor lose the signal: ignoring both stop
signals process-wide for each start (the previous fix) discarded a SIGTERM the kernel
handed to another thread (numpy's OpenBLAS thread is always there), and the backup went
on (tests/test_backup_startup.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.connection import Connection

from snapferry.engine.pool import _ignoring_stop_signals


def _report(conn: Connection) -> None:
    # the first thing the child does: what did it inherit?
    conn.send((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
    conn.close()


def test_spawned_worker_starts_with_sigint_ignored() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    proc = ctx.Process(target=_report, args=(child,))
    with _ignoring_stop_signals():
        proc.start()
    child.close()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    sigint, _sigterm = parent.recv()
    proc.join(30)
    assert sigint == signal.SIG_IGN


def test_a_stop_signal_during_the_start_is_delivered_after_it() -> None:
    """Sent to the process while a worker starts, with another thread running (which
    the kernel may pick): held, then delivered once, after the start."""
    got: list[tuple[int, bool]] = []
    inside = threading.Event()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()  # its mask was copied before the block: it takes the signal
    old = signal.signal(signal.SIGTERM, lambda n, _f: got.append((n, inside.is_set())))
    try:
        with _ignoring_stop_signals():
            inside.set()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler would have run by now, were it not held
            assert got == []
            inside.clear()
        assert got == [(signal.SIGTERM, False)]
    finally:
        signal.signal(signal.SIGTERM, old)
        stop.set()
        other.join(5)


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
