"""Parse ``vsphere://USER@HOST[:PORT]/VM_NAME_OR_MOREF?thumbprint=...&insecure=1&transport=nbd``.

* ``USER`` may be percent-encoded (``administrator%40vsphere.local``); a password in
  the URI is refused: it comes from ``SNAPFERRY_VSPHERE_PASSWORD`` or a prompt.
* ``VM_NAME_OR_MOREF``: a VM's inventory name (percent-encoded when it holds ``/`` or
  spaces) or its managed object id (``vm-42``). A path shaped like ``vm-N`` is read as
  an id unless ``moref=0`` is given; ``moref=1`` forces the id reading.
* ``thumbprint``: SHA-1 (40 hex digits) or SHA-256 (64) of the server certificate, with
  or without ``:``; the connection is pinned to exactly that certificate.
* ``insecure=1``: plain http, no TLS at all (the simulator; never a real vCenter).
* ``transport``: ``vddk`` (default) or ``nbd`` (nbdkit's vddk plugin run by the user).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from snapferry.engine.errors import UsageError

Transport = Literal["vddk", "nbd"]

_MOREF = re.compile(r"^vm-\d+$")
_HEX = re.compile(r"^[0-9a-f]+$")
_KNOWN = {"thumbprint", "insecure", "transport", "moref"}


@dataclass(frozen=True)
class VsphereTarget:
    """Where the VM is and how to talk to its vCenter/ESXi."""

    user: str
    host: str
    port: int
    vm: str
    vm_is_moref: bool
    thumbprint: str | None = None  # lower-case hex, no separators
    insecure: bool = False
    transport: Transport = "vddk"

    @property
    def scheme(self) -> str:
        return "http" if self.insecure else "https"

    def display(self) -> str:
        """The URI without secrets (for messages and the manifest)."""
        default = 80 if self.insecure else 443
        port = "" if self.port == default else f":{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"vsphere://{self.user}@{host}{port}/{self.vm}"


def normalize_thumbprint(text: str) -> str:
    """``AA:BB:..`` or ``aabb..`` → lower-case hex; raises ``UsageError`` if malformed."""
    t = text.strip().replace(":", "").lower()
    if len(t) not in (40, 64) or not _HEX.match(t):
        raise UsageError(
            f"bad certificate thumbprint {text!r}: expected the SHA-1 (40 hex digits) or "
            "SHA-256 (64 hex digits) fingerprint of the server certificate"
        )
    return t


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise UsageError(f"vsphere URI: {name}={value!r} is not a boolean (use 1 or 0)")


def parse_vsphere_uri(uri: str) -> VsphereTarget:
    """Parse a ``vsphere://`` URI; raises ``UsageError`` with the reason when malformed."""
    parts = urlsplit(uri)
    if parts.scheme != "vsphere":
        raise UsageError(f"not a vsphere URI: {uri!r} (expected vsphere://USER@HOST/VM)")
    if parts.password is not None:
        raise UsageError(
            "vsphere URI: do not put the password in the URI (it would show in the process "
            "list); set SNAPFERRY_VSPHERE_PASSWORD or answer the prompt"
        )
    if not parts.username:
        raise UsageError("vsphere URI: the user is missing (vsphere://USER@HOST/VM)")
    if not parts.hostname:
        raise UsageError("vsphere URI: the host is missing (vsphere://USER@HOST/VM)")
    try:
        port_given = parts.port
    except ValueError as e:
        raise UsageError(f"vsphere URI: bad port ({e})") from None
    vm = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not vm:
        raise UsageError("vsphere URI: the VM name or moref is missing (vsphere://USER@HOST/VM)")

    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _KNOWN)
    if unknown:
        raise UsageError(
            f"vsphere URI: unknown parameter(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_KNOWN))})"
        )

    def one(name: str) -> str | None:
        values = query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise UsageError(f"vsphere URI: {name} given more than once")
        return values[0]

    insecure = _flag("insecure", one("insecure") or "0")
    tp = one("thumbprint")
    thumbprint = normalize_thumbprint(tp) if tp else None
    if insecure and thumbprint:
        raise UsageError(
            "vsphere URI: insecure=1 (plain http) and thumbprint= (pinned https) exclude "
            "each other"
        )
    transport = (one("transport") or "vddk").lower()
    if transport not in ("vddk", "nbd"):
        raise UsageError(f"vsphere URI: transport={transport!r}: use vddk or nbd")
    moref = one("moref")
    is_moref = _flag("moref", moref) if moref is not None else bool(_MOREF.match(vm))
    port = port_given if port_given is not None else (80 if insecure else 443)
    return VsphereTarget(
        user=unquote(parts.username),
        host=parts.hostname,
        port=port,
        vm=vm,
        vm_is_moref=is_moref,
        thumbprint=thumbprint,
        insecure=insecure,
        transport="nbd" if transport == "nbd" else "vddk",
    )
