"""``PackSaver``: a reader worker's finished packs saved in a thread, off its hot path.

A worker that saves its own packs stops hashing and compressing while the pack is
written and made durable (``fsync`` of a 32 MiB file, its index file, the directory):
on the benchmark's 4 GiB image that was 1-2 s of every worker's wall time with its CPU
idle. The saver takes one finished pack at a time and saves it, then its index file
(rule W3: the same order as ``PackWriter.flush``), then — when asked — reads the pack
back and checks every blob in it (``verify_pack``: what the pre-commit verify does
later, done while the worker goes on with the next pack).

Bounded memory: at most one pack is being saved while the next one fills; ``submit``
waits for the previous save to end. A failure (I/O, a pack that does not read back)
is raised in the worker's thread at its next ``submit``, ``take`` or ``wait``, with
what was saved before it still reported, so that an abort can remove it.

The thread is a daemon: a worker that dies (or whose parent died) takes it along; the
temp file of a save cut short carries the worker's pid and is removed by the backup's
abort, or left for ``snapferry cleanup``/prune like any killed writer's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from snapferry.engine import faults
from snapferry.engine.store.backend import Backend
from snapferry.engine.store.pack import FinishedPack, WrittenObjects, save_finished


class PackSaver:
    """One thread that saves (and optionally verifies) the packs handed to ``submit``."""

    def __init__(self, backend: Backend, verify: Callable[[str], object] | None = None) -> None:
        self._backend = backend
        self._verify = verify
        self._cv = threading.Condition()
        self._job: FinishedPack | None = None
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._done = WrittenObjects()
        self._thread = threading.Thread(target=self._run, name="snapferry-pack-saver",
                                        daemon=True)
        self._thread.start()

    # -- the worker's side ---------------------------------------------------------------
    def submit(self, job: FinishedPack) -> None:
        """Hand over a finished pack; waits while the previous one is still being saved."""
        with self._cv:
            while (self._job is not None or self._busy) and self._error is None:
                self._cv.wait()
            self._raise()
            if self._closed:
                raise RuntimeError("the pack saver is closed")
            self._job = job
            self._cv.notify_all()

    def wait(self) -> None:
        """Until every submitted pack is saved (and verified); raises a save's failure."""
        with self._cv:
            while (self._job is not None or self._busy) and self._error is None:
                self._cv.wait()
            self._raise()

    def take(self) -> WrittenObjects:
        """What was saved since the last call (a failure is raised after it is taken
        by ``wait``/``submit``; what it saved before failing is returned here)."""
        with self._cv:
            w, self._done = self._done, WrittenObjects()
            return w

    def close(self) -> None:
        """Stop the thread once it is idle (does not wait for a save under way)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while self._job is None and not self._closed:
                    self._cv.wait()
                job = self._job
                if job is None:
                    return
                self._job = None
                self._busy = True
            saved = WrittenObjects()
            error: BaseException | None = None
            try:
                save_finished(self._backend, job, saved)
                faults.pack_saved(self._backend, job.name, job.data)
                job.data = b""  # saved: its memory goes before the read-back's comes
                if self._verify is not None:
                    self._verify(job.name)
                    saved.verified.append(job.name)
            except BaseException as e:  # handed to the worker's thread
                error = e
            with self._cv:
                self._done.extend(saved)
                self._busy = False
                if error is not None and self._error is None:
                    self._error = error
                self._cv.notify_all()
            if error is not None:
                return
