"""libvirt target strings -> connection URI + domain (no libvirtd needed)."""

from __future__ import annotations

import re

import pytest

from snapferry.engine.errors import UsageError
from snapferry.engine.libvirt.uri import is_libvirt_uri, parse_libvirt_uri
from snapferry.engine.targets import is_vm_target


@pytest.mark.parametrize(
    ("source", "conn", "domain", "remote"),
    [
        ("libvirt:///system/web1", "qemu:///system", "web1", False),
        ("libvirt:///session/dev", "qemu:///session", "dev", False),
        ("qemu:///system/db%20two", "qemu:///system", "db two", False),
        ("qemu:///system/web1?socket=/tmp/lv.sock", "qemu:///system?socket=/tmp/lv.sock",
         "web1", False),
        ("qemu+ssh://root@host1/system/vm", "qemu+ssh://root@host1/system", "vm", True),
        ("qemu+ssh://host1:2222/system/vm?keyfile=/k", "qemu+ssh://host1:2222/system?keyfile=/k",
         "vm", True),
        ("qemu+tls://host1/system/vm", "qemu+tls://host1/system", "vm", True),
    ],
)
def test_forms(source: str, conn: str, domain: str, remote: bool) -> None:
    t = parse_libvirt_uri(source)
    assert (t.conn_uri, t.domain, t.remote) == (conn, domain, remote)
    assert is_libvirt_uri(source) and is_vm_target(source)
    assert t.key.endswith("#" + domain)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("libvirt:///system", "expected"),
        ("libvirt:///system/a/b", "expected"),
        ("libvirt:///other/vm", "expected"),
        ("libvirt://host/system/vm", "three slashes"),
        ("qemu://host/system/vm", "qemu+tls"),
        ("libvirt:///system/vm#x", "fragment"),
        ("vsphere://u@h/vm", "not a libvirt target"),
    ],
)
def test_bad_forms(source: str, words: str) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        parse_libvirt_uri(source)


def test_qemu_unix_stays_the_qmp_target() -> None:
    assert not is_libvirt_uri("qemu+unix:///run/vm/qmp.sock?agent=/run/vm/qga.sock")
