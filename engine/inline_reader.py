"""The reader pool's stand-in when a source takes no second client.

``qemu-nbd`` without ``-e`` (one client at a time) and without ``-t`` (exits when its
last client leaves) can be read only through the connection the backup planned with:
a worker's own connection would wait unanswered in the server's backlog, and dropping
the planning connection first ends the server. ``InlineReader`` does the workers' job —
read, zero check, id, dedup, compress, store, pre-commit verify — in the backup process
itself, through the caller's open sources, with one ``ChunkWriter``. It offers the part
of ``ReaderPool``'s interface that ``BackupSession`` uses (``run``, ``close``,
``terminate``, ``stats``).
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Callable, Iterable
from typing import Any

from snapferry.engine.pool import PoolConfig, PoolStats, Request, WorkerStats
from snapferry.engine.pool import _Worker as Worker
from snapferry.engine.source import DiskSource
from snapferry.engine.store.chunks import WrittenObjects


class InlineReader:
    """One in-process reader over already open sources (``{disk no: (source, size)}``);
    the sources stay the caller's: closing the reader does not close them."""

    def __init__(self, cfg: PoolConfig, sources: dict[int, tuple[DiskSource, int]]) -> None:
        self._worker: Worker | None = Worker(cfg, 0)
        self._disks = set(sources)
        for disk, (src, size) in sources.items():
            self._worker.specs[disk] = (src.spec(), size)
            self._worker.sources[disk] = src
        self.stats = PoolStats()

    def run(
        self,
        messages: Iterable[Request],
        on_result: Callable[[Any], None],
        *,
        broadcast: bool = False,
    ) -> None:
        """Handle each request here, in order; errors propagate as the worker raises
        them (``broadcast`` is the same thing with one reader)."""
        w = self._worker
        if w is None:
            raise RuntimeError("the in-process reader is closed")
        for msg in messages:
            try:
                result = w.handle(msg)
            except BaseException as e:
                _drop_frames(e)
                raise
            on_result(result)

    def _shut(self) -> Worker | None:
        w, self._worker = self._worker, None
        if w is not None:
            for disk in self._disks:
                w.sources.pop(disk, None)  # the caller's: not ours to close
            w.close()
        return w

    def close(self) -> None:
        w = self._shut()
        if w is not None:
            rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            self.stats.workers.append(WorkerStats(0, os.getpid(), w.done_chunks, rss))

    def terminate(self) -> WrittenObjects:
        """Stop here (a failure or a signal): waits for a pack save under way (it runs
        on this process's saver thread) and returns what was saved and not yet
        reported, for the caller to remove."""
        w = self._worker
        left = WrittenObjects()
        if w is not None:
            saver = w.writer.saver
            if saver is not None:
                with contextlib.suppress(BaseException):
                    saver.wait()  # the pack being filled is not saved: abort drops it
            with contextlib.suppress(Exception):
                left = w.writer.take_written()
        self._shut()
        return left


def _drop_frames(e: BaseException) -> None:
    """Forget the reader's frames in ``e``'s traceback chain: they hold slices of its
    segment buffers, and a traceback kept until interpreter exit (the CLI's error path)
    made the exit print "BufferError: memoryview has 1 exported buffer" after the one
    error line. The raise in ``run`` starts a fresh traceback there."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        x.__traceback__ = None
        stack += [x.__context__, x.__cause__]
