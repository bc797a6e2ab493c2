"""vsphere:// URI parsing and the password source (no server needed)."""

from __future__ import annotations

import pytest

from snapferry.engine.errors import UsageError
from snapferry.engine.vsphere.connect import PASSWORD_ENV, colon_form, get_password
from snapferry.engine.vsphere.uri import normalize_thumbprint, parse_vsphere_uri

SHA1 = "2C:11:ED:D7:13:87:7D:B5:74:18:B8:1C:42:C2:56:1F:0D:B9:5B:B9"


def test_full_uri() -> None:
    t = parse_vsphere_uri(
        f"vsphere://administrator%40vsphere.local@vc.example:8443/web%2001?thumbprint={SHA1}"
        "&transport=nbd"
    )
    assert t.user == "administrator@vsphere.local"
    assert (t.host, t.port) == ("vc.example", 8443)
    assert t.vm == "web 01" and not t.vm_is_moref
    assert t.thumbprint == SHA1.replace(":", "").lower()
    assert t.transport == "nbd" and not t.insecure and t.scheme == "https"
    assert t.display() == "vsphere://administrator@vsphere.local@vc.example:8443/web 01"


def test_defaults_and_moref() -> None:
    t = parse_vsphere_uri("vsphere://root@esx1/vm-42")
    assert (t.port, t.transport, t.vm_is_moref) == (443, "vddk", True)
    assert parse_vsphere_uri("vsphere://root@esx1/vm-42?moref=0").vm_is_moref is False
    assert parse_vsphere_uri("vsphere://root@esx1/odd?moref=1").vm_is_moref is True
    t = parse_vsphere_uri("vsphere://u@127.0.0.1/x?insecure=1")
    assert (t.port, t.scheme) == (80, "http")


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("nbd://host/x", "not a vsphere URI"),
        ("vsphere://u:secret@h/vm", "password"),
        ("vsphere://h/vm", "user is missing"),
        ("vsphere://u@h/", "VM name"),
        ("vsphere://u@h/vm?thumbprint=abc", "thumbprint"),
        ("vsphere://u@h/vm?transport=ftp", "transport"),
        ("vsphere://u@h/vm?insecure=maybe", "boolean"),
        ("vsphere://u@h/vm?color=red", "unknown parameter"),
        (f"vsphere://u@h/vm?insecure=1&thumbprint={SHA1}", "exclude"),
        ("vsphere://u@h/vm?transport=nbd&transport=vddk", "more than once"),
    ],
)
def test_bad_uris_are_usage_errors(uri: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_vsphere_uri(uri)


def test_thumbprint_forms() -> None:
    plain = SHA1.replace(":", "").lower()
    assert normalize_thumbprint(SHA1) == plain
    assert normalize_thumbprint(plain.upper()) == plain
    assert colon_form(plain) == SHA1
    assert len(normalize_thumbprint("ab" * 32)) == 64


def test_password_from_env_prompt_or_refused() -> None:
    t = parse_vsphere_uri("vsphere://u@h/vm")
    assert get_password(t, env={PASSWORD_ENV: "pw"}, interactive=True) == "pw"
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return "typed"

    assert get_password(t, env={}, prompt=prompt, interactive=True) == "typed"
    assert asked == ["Password for u@h: "]
    with pytest.raises(UsageError, match=PASSWORD_ENV):
        get_password(t, env={}, interactive=False)
