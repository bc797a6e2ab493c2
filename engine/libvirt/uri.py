"""libvirt targets: a SOURCE string -> (libvirt connection URI, domain name).

Accepted forms (the domain is the last path element, URL-escaped if needed):

* ``libvirt:///system/DOMAIN``   -> ``qemu:///system``   (``libvirt:///session/DOMAIN``
  -> ``qemu:///session``)
* ``qemu:///system/DOMAIN``      -> ``qemu:///system``
* ``qemu+ssh://[USER@]HOST[:PORT]/system/DOMAIN[?QUERY]`` (also ``+tcp``, ``+tls``,
  ``+libssh``, ``+libssh2``) -> ``qemu+ssh://[USER@]HOST[:PORT]/system[?QUERY]``

The query string is libvirt's own (``socket=``, ``keyfile=``, ``no_verify=``, ...) and
is handed to the connection URI unchanged. ``qemu+unix://`` is not a libvirt form here:
that scheme names a bare QEMU's QMP socket (``snapferry.engine.targets``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from snapferry.engine.errors import UsageError

LIBVIRT_SCHEMES = ("libvirt", "qemu", "qemu+ssh", "qemu+tcp", "qemu+tls", "qemu+libssh",
                   "qemu+libssh2")
_DRIVER_PATHS = ("system", "session")


@dataclass(frozen=True)
class LibvirtTarget:
    conn_uri: str  # what libvirt.open() takes
    domain: str
    remote: bool  # the domain runs on another host

    @property
    def key(self) -> str:
        """Identifies the domain for the per-VM work directory."""
        return f"libvirt:{self.conn_uri}#{self.domain}"


def is_libvirt_uri(source: str) -> bool:
    return urlsplit(source).scheme in LIBVIRT_SCHEMES


def parse_libvirt_uri(source: str) -> LibvirtTarget:
    parts = urlsplit(source)
    if parts.scheme not in LIBVIRT_SCHEMES:
        raise UsageError(f"not a libvirt target: {source!r} (expected libvirt:///system/DOMAIN)")
    if parts.fragment:
        raise UsageError(f"{source!r}: a libvirt target takes no #fragment")
    segs = [s for s in parts.path.split("/") if s]
    form = f"{parts.scheme}://{parts.netloc or ''}/system/DOMAIN"
    if len(segs) != 2 or segs[0] not in _DRIVER_PATHS:
        raise UsageError(f"{source!r}: expected {form} (or /session/DOMAIN)")
    driver, domain = segs[0], unquote(segs[1])
    if not domain or "/" in domain:
        raise UsageError(f"{source!r}: empty or bad domain name")
    if parts.scheme == "libvirt":
        if parts.netloc:
            raise UsageError(
                f"{source!r}: libvirt:// names a local libvirtd (three slashes); for another "
                "host use qemu+ssh://HOST/system/DOMAIN"
            )
        scheme = "qemu"
    else:
        scheme = parts.scheme
    if scheme == "qemu" and parts.netloc:
        raise UsageError(
            f"{source!r}: qemu:// with a host is libvirt's TCP/TLS transport: write it as "
            "qemu+tls://HOST/system/DOMAIN or qemu+ssh://HOST/system/DOMAIN"
        )
    query = f"?{parts.query}" if parts.query else ""
    conn = f"{scheme}://{parts.netloc}/{driver}{query}"
    return LibvirtTarget(conn_uri=conn, domain=domain, remote=bool(parts.netloc))
