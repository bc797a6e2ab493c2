"""Connection to vCenter/ESXi with pyvmomi: credentials, certificate pinning, VM lookup.

Certificate policy (see ``snapferry.engine.vsphere.uri``):

* ``thumbprint=`` given: TLS without CA/hostname checks, but every TLS connection
  pyvmomi opens must present exactly the pinned certificate (checked right after the
  handshake, before any byte of the request, so there is no window between a probe and
  the real connection). Expiry is not checked: the pin is the trust decision.
* neither: the system CA store and hostname check; when that fails the error names the
  server's SHA-256 fingerprint so the user can pin it after checking it out of band.
* ``insecure=1``: plain http (the simulator). A note says that the password travels
  in clear.

The password never comes from the command line: ``SNAPFERRY_VSPHERE_PASSWORD`` or an
interactive prompt.
"""

from __future__ import annotations

import getpass
import hashlib
import http.client
import os
import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from snapferry.engine.errors import HypervisorError, UsageError
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.vsphere.uri import VsphereTarget

PASSWORD_ENV = "SNAPFERRY_VSPHERE_PASSWORD"


def get_password(
    target: VsphereTarget,
    env: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
    interactive: bool | None = None,
) -> str:
    """The password from ``SNAPFERRY_VSPHERE_PASSWORD``, else an interactive prompt."""
    environ = os.environ if env is None else env
    value = environ.get(PASSWORD_ENV)
    if value is not None:
        return value
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:
        raise UsageError(
            f"no password for {target.user}@{target.host}: set {PASSWORD_ENV} "
            "(stdin is not a terminal, so there is nobody to prompt)"
        )
    ask = prompt or getpass.getpass
    return ask(f"Password for {target.user}@{target.host}: ")


def thumbprint_hex(der: bytes, algorithm: str) -> str:
    """Lower-case hex digest of a DER certificate (``sha1`` or ``sha256``)."""
    return hashlib.new(algorithm, der).hexdigest()


def colon_form(hexdigest: str) -> str:
    """``aabb..`` → ``AA:BB:..`` (the form VDDK and vSphere show)."""
    up = hexdigest.upper()
    return ":".join(up[i : i + 2] for i in range(0, len(up), 2))


def cert_matches(der: bytes, pinned: str) -> bool:
    """Does the certificate match a pinned SHA-1 (40 hex) or SHA-256 (64 hex) thumbprint?"""
    algorithm = "sha1" if len(pinned) == 40 else "sha256"
    return thumbprint_hex(der, algorithm) == pinned


def fetch_certificate(host: str, port: int, timeout: float = 10.0) -> bytes:
    """The server's certificate (DER), fetched WITHOUT verification: for messages only."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise HypervisorError(f"{host}:{port} presented no TLS certificate")
    return der


class ThumbprintMismatch(ssl.SSLError):
    """The server presented a certificate other than the pinned one."""

    def __init__(self, expected: str, der: bytes) -> None:
        self.expected = expected
        self.der = der
        algorithm = "sha1" if len(expected) == 40 else "sha256"
        self.actual = thumbprint_hex(der, algorithm)
        super().__init__(f"certificate thumbprint {self.actual} is not the pinned {expected}")


class PinnedContext(ssl.SSLContext):
    """An SSL context that accepts exactly one certificate, identified by thumbprint."""

    pinned: str
    peer_der: bytes | None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        tls = super().wrap_socket(sock, *args, **kwargs)
        der = tls.getpeercert(binary_form=True)
        if not der or not cert_matches(der, self.pinned):
            tls.close()
            raise ThumbprintMismatch(self.pinned, der or b"")
        self.peer_der = der
        return tls


def pinned_context(thumbprint: str) -> PinnedContext:
    ctx = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.pinned = thumbprint
    ctx.peer_der = None
    return ctx


@dataclass
class VsphereConnection:
    """A logged-in pyvmomi session. ``cert_der`` is None over plain http."""

    target: VsphereTarget
    si: Any
    cert_der: bytes | None = None
    _closed: bool = field(default=False, repr=False)
    _content: Any = field(default=None, repr=False)

    @property
    def content(self) -> Any:
        """The ServiceContent (fetched once: every RetrieveContent is a round trip)."""
        if self._content is None:
            self._content = self.si.RetrieveContent()
        return self._content

    def vddk_thumbprint(self) -> str:
        """SHA-1 thumbprint in ``AA:BB:..`` form, as VDDK's ConnectParams wants it."""
        if self.cert_der is None:
            return ""
        return colon_form(thumbprint_hex(self.cert_der, "sha1"))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            Disconnect(self.si)
        except Exception:  # logging out of a dead session: nothing left to release
            pass


def _unreachable(target: VsphereTarget, e: BaseException) -> HypervisorError:
    return HypervisorError(
        f"cannot reach {target.scheme}://{target.host}:{target.port}: {e}"
    )


def connect(
    target: VsphereTarget,
    password: str,
    *,
    timeout: float = 60.0,
    progress: Progress | None = None,
) -> VsphereConnection:
    """Log in to the vCenter/ESXi named by ``target``; every failure is a HypervisorError."""
    progress = progress or NullProgress()
    ctx: ssl.SSLContext | None = None
    if target.insecure:
        if target.host not in ("127.0.0.1", "::1", "localhost"):
            progress.note(
                f"warning: insecure=1: talking plain http to {target.host}, the password "
                "travels unencrypted"
            )
    elif target.thumbprint:
        ctx = pinned_context(target.thumbprint)
    else:
        ctx = ssl.create_default_context()
    try:
        si = SmartConnect(
            protocol=target.scheme,
            host=target.host,
            port=target.port,
            user=target.user,
            pwd=password,
            sslContext=ctx,
            httpConnectionTimeout=int(timeout),
        )
    except ThumbprintMismatch as e:
        raise HypervisorError(
            f"{target.host}:{target.port} presented a certificate with thumbprint "
            f"{colon_form(e.actual)}, not the pinned {colon_form(e.expected)}: refusing to "
            "connect (if the certificate was renewed, check it and update ?thumbprint=)"
        ) from None
    except ssl.SSLCertVerificationError as e:
        hint = ""
        try:
            seen = fetch_certificate(target.host, target.port, timeout=min(timeout, 10.0))
            hint = (
                f"; the server's SHA-256 thumbprint is {colon_form(thumbprint_hex(seen, 'sha256'))}"
                ": after checking it out of band, pin it with ?thumbprint=..."
            )
        except Exception:
            pass
        raise HypervisorError(
            f"certificate of {target.host}:{target.port} not trusted ({e.verify_message})"
            f"{hint}"
        ) from None
    except vim.fault.InvalidLogin:
        raise HypervisorError(
            f"login to {target.host} as {target.user} failed: wrong user or password"
        ) from None
    except vmodl.MethodFault as e:
        raise HypervisorError(
            f"login to {target.host} failed: {getattr(e, 'msg', None) or type(e).__name__}"
        ) from None
    except ssl.SSLError as e:
        raise HypervisorError(f"TLS with {target.host}:{target.port} failed: {e}") from None
    except (OSError, http.client.HTTPException) as e:
        raise _unreachable(target, e) from None
    except Exception as e:  # pyvmomi raises bare Exception for "not a VIM server"
        raise HypervisorError(
            f"{target.scheme}://{target.host}:{target.port} is not a usable vSphere API "
            f"endpoint: {e}"
        ) from None
    der: bytes | None = ctx.peer_der if isinstance(ctx, PinnedContext) else None
    if ctx is not None and der is None:
        try:
            der = fetch_certificate(target.host, target.port, timeout=min(timeout, 10.0))
        except Exception:  # only used to hand VDDK a thumbprint; VDDK will say if it lacks it
            der = None
    return VsphereConnection(target=target, si=si, cert_der=der)


def find_vm(conn: VsphereConnection, target: VsphereTarget) -> Any:
    """The ``vim.VirtualMachine`` named by ``target.vm`` (moref or unique name).

    One property-collector pass over all VMs' names answers both forms (a moref is
    matched against the ids listed, so an unknown id is a clear "no such VM").
    """
    content = conn.content
    view = content.viewManager.CreateContainerView(
        content.rootFolder, [vim.VirtualMachine], True
    )
    try:
        pc = content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[
                vmodl.query.PropertyCollector.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        vmodl.query.PropertyCollector.TraversalSpec(
                            name="view", path="view", skip=False, type=vim.view.ContainerView
                        )
                    ],
                )
            ],
            propSet=[
                vmodl.query.PropertyCollector.PropertySpec(
                    type=vim.VirtualMachine, pathSet=["name"], all=False
                )
            ],
        )
        names = {
            oc.obj: next((p.val for p in oc.propSet or [] if p.name == "name"), None)
            for oc in pc.RetrieveContents([spec]) or []
        }
    finally:
        try:
            view.DestroyView()
        except Exception:
            pass
    if target.vm_is_moref:
        by_id = [vm for vm in names if vm._moId == target.vm]
        if not by_id:
            raise HypervisorError(f"no VM with moref {target.vm} on {target.host}")
        return by_id[0]
    found = [vm for vm, name in names.items() if name == target.vm]
    if not found:
        raise HypervisorError(f"no VM named {target.vm!r} on {target.host}")
    if len(found) > 1:
        ids = ", ".join(sorted(o._moId for o in found))
        raise HypervisorError(
            f"{len(found)} VMs are named {target.vm!r} on {target.host} ({ids}): "
            "name the one to back up by its moref (vsphere://USER@HOST/vm-N)"
        )
    return found[0]


def read_properties(conn: VsphereConnection, obj: Any, paths: list[str]) -> dict[str, Any]:
    """Read properties of one managed object through the property collector; unset ones
    come back as None (reading an unset property as an attribute, e.g. ``vm.snapshot``
    on a VM without snapshots, crashes vCSim's Fetch)."""
    vpc = vmodl.query.PropertyCollector
    spec = vpc.FilterSpec(
        objectSet=[vpc.ObjectSpec(obj=obj, skip=False)],
        propSet=[vpc.PropertySpec(type=type(obj), pathSet=list(paths), all=False)],
    )
    out: dict[str, Any] = dict.fromkeys(paths)
    for oc in conn.content.propertyCollector.RetrieveContents([spec]) or []:
        for prop in oc.propSet or []:
            out[prop.name] = prop.val
    return out
