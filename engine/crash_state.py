"""What a hypervisor backend keeps on the host so that a later process can put things
right after a backup process died: a small JSON state file per VM work directory (a
hint only: the hypervisor's own answers decide) and the path of the NBD socket there.

One copy for the QEMU and libvirt backends (they had one each).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 108 bytes


def read_state(path: Path) -> dict[str, Any]:
    """The state file's object; ``{}`` when absent or unreadable (a hint, never fatal)."""
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def update_state(path: Path, **kv: Any) -> None:
    """Set keys (a false value removes the key), written atomically (temp + rename)."""
    st = read_state(path)
    st.update(kv)
    st = {k: v for k, v in st.items() if v}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(st))
    tmp.replace(path)


def nbd_socket_path(work_dir: Path, prefix: str) -> Path:
    """``work_dir/nbd.sock``, or ``/tmp/PREFIX-<digest>.sock`` when that path is too long
    for a unix socket."""
    path = work_dir.resolve() / "nbd.sock"
    if len(str(path)) > SOCKET_PATH_MAX:
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"{prefix}-{digest}.sock"
    return path
