"""Pre-parse the libnbd declarations into an out-of-line cffi ABI module.

``python -m snapferry.native.ffi_build`` (run by ``scripts/setup.sh``) writes
``native/_libnbd_ffi.py``: the declarations of ``_libnbd_cdef`` already parsed, so that
loading libnbd no longer imports pycparser and parses them at every start of a process
(~55 ms of each backup process and reader-pool worker: 66 ms -> 11 ms here). No C
compiler is involved (cffi's out-of-line ABI mode writes Python).

The generated module records the SHA-256 of the declarations it was made from;
``libnbd.load`` uses it only when that matches today's ``_libnbd_cdef.CDEF`` and
otherwise parses them as before, so a stale or missing file costs time, never a wrong
call.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from snapferry.native import _libnbd_cdef as C

MODULE = "_libnbd_ffi"


def cdef_digest() -> str:
    return hashlib.sha256(C.CDEF.encode()).hexdigest()


def build(outdir: Path | None = None) -> Path:
    """Write ``<outdir>/_libnbd_ffi.py`` (default: this package's folder); its path."""
    import tempfile

    import cffi

    out = Path(outdir) if outdir is not None else Path(__file__).resolve().parent
    b = cffi.FFI()
    b.cdef(C.CDEF)
    b.set_source(MODULE, None)
    with tempfile.TemporaryDirectory(prefix="sf-ffi-") as tmp:
        made = Path(b.compile(tmpdir=tmp, verbose=False))
        text = made.read_text() + f'\nCDEF_SHA256 = "{cdef_digest()}"\n'
    target = out / f"{MODULE}.py"
    part = target.with_name(f".{MODULE}.{os.getpid()}.tmp")
    part.write_text(text)
    os.replace(part, target)  # a reader sees the old file or the new one, whole
    return target


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
