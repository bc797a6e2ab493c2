"""VM targets and source URIs: the command line's choices reach the backend, malformed
URIs are one clear usage error (issue 15, items 10 and 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

from snapferry.engine import faults
from snapferry.engine.errors import UsageError
from snapferry.engine.sources import NBD_SCHEMES, open_source, scheme_of
from snapferry.engine.targets import TargetOptions, VsphereCliOptions, open_hypervisor
from snapferry.engine.vsphere.backend import VsphereHypervisor


def test_cli_transport_overrides_the_uri_for_vsphere() -> None:
    """``--transport nbd`` was ignored: only the URI's ``transport=`` was read."""
    opts = TargetOptions(vsphere=VsphereCliOptions(
        transport="nbd", nbd_uri="nbd+unix:///{disk}?socket=/nonexistent.sock"))
    hv = open_hypervisor("vsphere://backup@vcenter.example/vm-1?insecure=1", opts)
    assert isinstance(hv, VsphereHypervisor)
    assert hv.target.transport == "nbd"
    assert hv.options.nbd_uri is not None and hv.options.vddk_libdir is None


@pytest.mark.parametrize("uri", ["nbd://127.0.0.1:99999/x", "nbd://[::1/x",
                                 "qemu+unix://[::1/x", "nbd://host:port/x"])
def test_malformed_uri_is_a_usage_error(uri: str) -> None:
    with pytest.raises(UsageError, match="malformed URI"):
        if scheme_of(uri) in NBD_SCHEMES:
            open_source(uri)
        else:
            open_hypervisor(uri)


@pytest.mark.parametrize("uri", ["nbd://127.0.0.1:99999/x", "nbd://[::1/x"])
def test_malformed_uri_from_the_cli(uri: str, tmp_path: Path) -> None:
    p = run_cli("backup", uri, "--repo", str(tmp_path), "--name", "x")
    line = assert_one_line_error(p, code=2)
    assert "malformed URI" in line and "internal error" not in line


def test_nbd_vsock_is_an_nbd_scheme() -> None:
    """``nbd+vsock://`` was refused by open_source though NbdSource supports it."""
    assert scheme_of("nbd+vsock://3:10809/x") in NBD_SCHEMES


def test_fault_spec_rejects_unknown_points() -> None:
    assert faults.spec(after_copy="sigkill") == "after-copy=sigkill"
    with pytest.raises(ValueError):
        faults.spec(after_coffee="sigkill")
    with pytest.raises(ValueError):
        faults.spec(after_copy="explode")


def test_a_long_name_is_kept_whole(tmp_path: Path) -> None:
    """A 300-character ``--name`` gave ``internal error: OSError: File name too long``
    (format 1 made it a directory name). In format 2 a series name lives only inside the
    manifest: it is stored, listed and restored from as given."""
    image = tmp_path / "d.raw"
    image.write_bytes(b"x" * 65536)
    repo = tmp_path / "repo"
    assert run_cli("init", str(repo)).returncode == 0
    name = "a" * 300
    p = run_cli("backup", str(image), "--repo", str(repo), "--name", name, "--json")
    assert p.returncode == 0, p.stderr
    listed = json.loads(run_cli("list", "--repo", str(repo), "--json").stdout)["backups"]
    assert [b["vm"] for b in listed] == [name]
    out = tmp_path / "out.raw"
    assert run_cli("restore", "--repo", str(repo), f"latest:{name}", "--to", str(out)
                   ).returncode == 0
    assert out.read_bytes() == image.read_bytes()
