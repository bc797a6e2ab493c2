"""Disk sources: local files, NBD exports (and VDDK through the vSphere backend).

``open_source`` turns a SOURCE string given by the user into a ``DiskSource``.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from snapferry.engine.errors import UsageError
from snapferry.engine.source import DiskSource

# The one list of NBD URI schemes (the NBD URI spec's; libnbd speaks them all).
NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")

ACCEPTED_FORMS = (
    "a path to a disk image (raw, qcow2 or any format qemu-img knows) or block device "
    "(disk.raw, vm.qcow2, /dev/vg/lv)",
    "nbd://HOST[:PORT]/EXPORT",
    "nbds://HOST[:PORT]/EXPORT",
    "nbd+unix:///EXPORT?socket=PATH",
    "nbd+vsock://CID[:PORT]/EXPORT",
    "VMs: qemu+unix:///PATH/qmp.sock?agent=PATH, vsphere://USER@HOST/VM, lab",
)


def split_uri(uri: str) -> SplitResult:
    """``urlsplit`` that refuses a malformed URI (an unclosed ``[`` IPv6 host, a port
    that is not a number in 0-65535) with a ``UsageError`` instead of a ValueError."""
    try:
        parts = urlsplit(uri)
        _ = parts.port  # validates the port
    except ValueError as e:
        raise UsageError(f"malformed URI {uri!r}: {e}") from None
    return parts


def scheme_of(uri: str) -> str | None:
    """The URI scheme of ``uri`` in lower case, or None for a plain path."""
    if "://" not in uri:
        return None
    return split_uri(uri).scheme.lower() or None


def open_source(
    uri: str, *, bitmap: str | None = None, image_format: str | None = None
) -> DiskSource:
    """Open a SOURCE string: a plain path → ``FileSource`` (raw) or ``ImageSource``
    (qcow2 and other formats qemu-img knows; ``image_format`` skips the probe);
    ``nbd://``, ``nbds://``, ``nbd+unix://``, ``nbd+vsock://`` → ``NbdSource`` (``bitmap`` names the
    dirty bitmap to read)."""
    scheme = scheme_of(uri)
    if scheme is None:
        from snapferry.engine.sources.image import open_image

        return open_image(uri, bitmap=bitmap, fmt=image_format)
    if scheme in NBD_SCHEMES:
        from snapferry.engine.sources.nbd import NbdSource  # written by the NBD engineer

        return NbdSource.open(uri, bitmap=bitmap)  # type: ignore[no-any-return,unused-ignore]
    raise UsageError(
        f"unsupported source {uri!r}; accepted forms: " + "; ".join(ACCEPTED_FORMS)
    )
