"""Connecting to vCSim with real pyvmomi over loopback: thumbprint pinning, VM lookup."""

from __future__ import annotations

import pytest
from vcsimserver import NO_TOOLS_VM, VM0, Vcsim, observe_vm

from snapferry.engine.errors import HypervisorError
from snapferry.engine.vsphere.connect import colon_form, connect, find_vm
from snapferry.engine.vsphere.uri import parse_vsphere_uri

pytest_plugins = ["vcsimserver"]  # the vcsim / vcsim_tls fixtures


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha256-colons"])
def test_pinned_thumbprint_connects(vcsim_tls: Vcsim, algorithm: str) -> None:
    sim = vcsim_tls
    tp = sim.sha1 if algorithm == "sha1" else sim.sha256
    assert tp is not None
    if algorithm.endswith("colons"):
        tp = colon_form(tp)
    target = parse_vsphere_uri(sim.uri(VM0, thumbprint=tp))
    conn = connect(target, sim.password)
    try:
        vm = find_vm(conn, target)
        assert vm.name == VM0
        # VDDK is handed the SHA-1 of the very certificate the session was pinned to
        assert sim.sha1 is not None
        assert conn.vddk_thumbprint() == colon_form(sim.sha1)
    finally:
        conn.close()


def test_thumbprint_mismatch_is_refused(vcsim_tls: Vcsim) -> None:
    sim = vcsim_tls
    target = parse_vsphere_uri(sim.uri(VM0, thumbprint="ab" * 32))
    with pytest.raises(HypervisorError) as info:
        connect(target, sim.password)
    msg = str(info.value)
    assert "refusing to connect" in msg
    assert sim.sha256 is not None and colon_form(sim.sha256) in msg
    assert "\n" not in msg


def test_untrusted_certificate_without_pin_names_the_thumbprint(vcsim_tls: Vcsim) -> None:
    sim = vcsim_tls
    target = parse_vsphere_uri(sim.uri(VM0))
    with pytest.raises(HypervisorError, match="not trusted") as info:
        connect(target, sim.password)
    assert sim.sha256 is not None and colon_form(sim.sha256) in str(info.value)


def test_plain_http_and_wrong_password(vcsim: Vcsim) -> None:
    target = parse_vsphere_uri(vcsim.uri(VM0))
    with pytest.raises(HypervisorError, match="wrong user or password"):
        connect(target, "not-the-password")
    conn = connect(target, vcsim.password)
    try:
        assert conn.cert_der is None and conn.vddk_thumbprint() == ""
        assert find_vm(conn, target).name == VM0
    finally:
        conn.close()
    conn.close()  # idempotent


def test_nothing_listening_is_one_clear_error(vcsim: Vcsim) -> None:
    target = parse_vsphere_uri(f"vsphere://u@127.0.0.1:1/{VM0}?insecure=1")
    with pytest.raises(HypervisorError, match="cannot reach"):
        connect(target, "x", timeout=5)


def test_find_vm_by_name_and_moref(vcsim: Vcsim) -> None:
    moref = observe_vm(vcsim, NO_TOOLS_VM)["moref"]
    assert isinstance(moref, str) and moref.startswith("vm-")
    by_name = parse_vsphere_uri(vcsim.uri(NO_TOOLS_VM))
    conn = connect(by_name, vcsim.password)
    try:
        assert find_vm(conn, by_name)._moId == moref
        by_moref = parse_vsphere_uri(vcsim.uri(moref))
        assert by_moref.vm_is_moref
        assert find_vm(conn, by_moref).name == NO_TOOLS_VM
        with pytest.raises(HypervisorError, match="no VM named 'nope'"):
            find_vm(conn, parse_vsphere_uri(vcsim.uri("nope")))
        with pytest.raises(HypervisorError, match="no VM with moref vm-999999"):
            find_vm(conn, parse_vsphere_uri(vcsim.uri("vm-999999")))
    finally:
        conn.close()
