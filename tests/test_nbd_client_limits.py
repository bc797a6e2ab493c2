"""NBD servers that limit their clients (issue 15, item 11): real qemu-nbd with and
without ``-t``, ``-e 1`` / ``-e 2`` / ``-e 4``, a full and a bitmap incremental through
the CLI, each restored byte for byte.

Without ``-t`` qemu-nbd exits when its last client leaves, so the backup's planning
connection must stay open until the copy is done; with ``-e 1`` no second client gets a
greeting at all, so the copy runs through that one connection in the backup process.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from nbdservers import NbdServer, NbdServers, make_image, nbd_servers, qemu_io, requires

from snapferry.engine.sources.nbd import NbdSource

__all__ = ["nbd_servers"]  # the fixture, imported for use below

MiB = 1 << 20
ONE_CLIENT = "takes no client beside the planning connection"


def to_raw(image: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image),
                    str(out)], check=True, capture_output=True)
    return out.read_bytes()


def backup(repo: Path, uri: str) -> tuple[dict, str]:
    p = run_cli("backup", uri, "--repo", repo, "--name", "limited", "--bitmap", "b0",
                "--workers", "2", "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout)), p.stderr


def restored(repo: Path, backup_id: str, out: Path) -> bytes:
    r = run_cli("restore", "--repo", repo, backup_id, "--to", out)
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


@requires("qemu-nbd", "qemu-img", "qemu-io")
@pytest.mark.parametrize(
    ("shared", "persistent", "readers"),
    [(1, False, "inline"), (2, False, 1), (4, True, 2)],
    ids=["e1", "e2", "t-e4"],
)
def test_full_and_incremental_through_a_client_limited_server(
    repo: Path, tmp_path: Path, nbd_servers: NbdServers,
    shared: int, persistent: bool, readers: str | int,
) -> None:
    img = make_image(tmp_path / "d.qcow2", 24 * MiB,
                     [(0, 0x11, 9 * MiB), (16 * MiB, 0x22, 5 * MiB + 4096)], fmt="qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)

    results = []
    sock: Path | None = None
    for round_no in range(2):
        # round 1 on the same socket: the same NBD URI, so the same series
        srv: NbdServer = nbd_servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", shared=shared,
                                              persistent=persistent, socket=sock)
        sock = srv.socket
        res, _err = backup(repo, srv.uri)
        results.append((res, to_raw(img, tmp_path / f"want{round_no}.raw")))
        if readers == "inline":
            assert res["workers"] == 1
            assert any(ONE_CLIENT in w for w in res["warnings"]), res["warnings"]
        else:
            # the full has >= 2 work items; the incremental's few dirty chunks make one
            assert isinstance(readers, int)
            assert res["workers"] == (readers if round_no == 0 else 1)
            assert not any(ONE_CLIENT in w for w in res["warnings"])
        if persistent:
            srv.stop()
        else:
            # the backup was its only client, held to the end: the server is done now
            assert srv.wait_exit(20) == 0, srv.log_text()
        if round_no == 0:
            qemu_io(img, "qcow2", ["write -P 0x33 4096 512", "write -P 0x44 12M 64k"])

    (full, want_full), (inc, want_inc) = results
    assert full["mode"] == "full" and inc["mode"] == "incremental"
    assert inc["parent"] == full["backup_id"]
    assert inc["disks"][0]["bytes_read"] < full["disks"][0]["bytes_read"]
    assert restored(repo, full["backup_id"], tmp_path / "full.out") == want_full
    assert restored(repo, inc["backup_id"], tmp_path / "inc.out") == want_inc
    assert want_full != want_inc


@requires("qemu-nbd", "qemu-img")
@pytest.mark.parametrize(("shared", "want", "room"), [(1, 1, 0), (2, 3, 1), (4, 8, 3)])
def test_spare_connections_counts_the_room_beside_ours(
    tmp_path: Path, nbd_servers: NbdServers, shared: int, want: int, room: int
) -> None:
    img = make_image(tmp_path / "d.raw", 2 * MiB, [(0, 0x21, MiB)])
    srv = nbd_servers.qemu_nbd(img, shared=shared, persistent=False)
    with NbdSource.open(srv.uri) as src:
        assert src.spare_connections(want, timeout_ms=1000) == room
        # the probes are gone and ours still reads; the server is still there
        buf = bytearray(4096)
        src.readinto(memoryview(buf), 0)
        assert buf == b"\x21" * 4096 and srv.alive()
        if room:
            with src.spec().open() as other:  # a probe's slot is free again
                other.readinto(memoryview(buf), MiB)
                assert buf == bytes(4096)
    assert srv.wait_exit(20) == 0
