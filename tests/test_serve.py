"""``snapferry serve``: a restore point as a read-only NBD export read by standard clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import servecli
from conftest import assert_one_line_error, run_cli
from servecli import needs_serve, pid_alive, serving, start_serve
from store_helpers import backup_image, flip_blob, make_mixed_image

from snapferry.engine.errors import RepositoryError
from snapferry.engine.store import Repository

pytestmark = needs_serve
short_dir = servecli.short_dir
CS = 256 << 10


def _fingerprint(repo: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in repo.rglob("*") if p.is_file() and "lock" not in p.parts[-2]}


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Repository, str, Path]:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    img = tmp_path / "disk.img"
    make_mixed_image(img, 40 * (1 << 20) + 4096 * 3, seed=11)
    m = backup_image(repo, {"sda": img, "sdb": img})
    return repo, m.backup_id, img


def test_nbdcopy_and_qemu_img_read_it_identical_to_restore(
    backed_up: tuple[Repository, str, Path], short_dir: Path, tmp_path: Path
) -> None:
    repo, bid, img = backed_up
    restored = tmp_path / "restored.raw"
    before = _fingerprint(repo.path)
    p = run_cli("restore", bid, "--repo", repo.path, "--disk", "sda", "--to", restored)
    assert p.returncode == 0, p.stderr
    with serving(repo.path, bid, "--disk", "sda", "--socket", str(short_dir / "s.sock")) as s:
        assert s.info["size"] == img.stat().st_size and s.info["disk"] == "sda"
        out = tmp_path / "copied.raw"
        r = subprocess.run(["nbdcopy", "--connections=4", s.uri, str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == restored.read_bytes() == img.read_bytes()
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(restored),
                            s.uri], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        info = json.loads(subprocess.run(["nbdinfo", "--json", s.uri], capture_output=True,
                                         text=True, check=True).stdout)
        exp = info["exports"][0]
        assert exp["is_read_only"] is True and exp["can_multi_conn"] is True
        assert "base:allocation" in exp["contexts"]
        # base:allocation: holes exactly where the index has zero chunks
        mapping = json.loads(subprocess.run(["nbdinfo", "--json", "--map", s.uri],
                                            capture_output=True, text=True, check=True).stdout)
        mask = repo.load_index(bid, "sda").nonzero_mask()
        seen = 0
        for e in mapping:
            off, n, kind = int(e["offset"]), int(e["length"]), int(e["type"])
            assert off == seen
            seen += n
            for i in range(off // CS, (off + n - 1) // CS + 1):
                assert bool(mask[i]) == (kind == 0), (i, kind)
        assert seen == img.stat().st_size
        # writes are refused by the server
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4096", s.uri],
                           capture_output=True, text=True)
        assert r.returncode != 0 or "read-only" in (r.stdout + r.stderr).lower()
    assert _fingerprint(repo.path) == before, "serving must not change the repository"


def test_tcp_port_and_clean_stop_on_sigint(
    backed_up: tuple[Repository, str, Path], tmp_path: Path
) -> None:
    repo, bid, _img = backed_up
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = start_serve(repo.path, bid, "--disk", "sdb", "--port", str(port))
    try:
        assert s.uri == f"nbd://127.0.0.1:{port}/"
        r = subprocess.run(["nbdcopy", s.uri, "null:"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        nbdkit_pid = s.info["pid"]
        assert pid_alive(nbdkit_pid)
    finally:
        code = s.stop(signal.SIGINT)
    assert code == 0, s.stderr
    assert s.stderr == ""
    assert not pid_alive(nbdkit_pid)
    with socket.socket() as again:  # nothing listens there any more (TIME_WAIT allowed)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_sigterm_stops_and_removes_the_socket(
    backed_up: tuple[Repository, str, Path], short_dir: Path
) -> None:
    repo, bid, _ = backed_up
    sock = short_dir / "t.sock"
    s = start_serve(repo.path, bid, "--disk", "sda", "--socket", str(sock))
    assert sock.exists()
    # serving holds the shared role: a deleter (prune) cannot start meanwhile
    with pytest.raises(RepositoryError), repo.lock("prune", exclusive=True):
        pass
    assert s.stop(signal.SIGTERM) == 0, s.stderr
    assert not sock.exists() and not pid_alive(s.info["pid"])
    with repo.lock("prune", exclusive=True):  # released on stop
        pass


def test_bad_input_is_one_line(
    backed_up: tuple[Repository, str, Path], short_dir: Path
) -> None:
    repo, bid, _ = backed_up
    sock = short_dir / "b.sock"
    line = assert_one_line_error(run_cli("serve", "20990101T000000Z-0000", "--repo", repo.path,
                                         "--socket", sock))
    assert "no restore point" in line
    line = assert_one_line_error(run_cli("serve", bid, "--repo", repo.path, "--disk", "nope",
                                         "--socket", sock))
    assert "no disk 'nope'" in line
    line = assert_one_line_error(run_cli("serve", bid, "--repo", repo.path, "--socket", sock))
    assert "2 disks" in line
    assert_one_line_error(run_cli("serve", bid, "--repo", repo.path, "--disk", "sda"))
    (short_dir / "file").write_text("x")
    line = assert_one_line_error(run_cli("serve", bid, "--repo", repo.path, "--disk", "sda",
                                         "--socket", short_dir / "file"))
    assert "not a socket" in line
    with serving(repo.path, bid, "--disk", "sda", "--socket", str(sock)) as s:
        line = assert_one_line_error(run_cli("serve", bid, "--repo", repo.path, "--disk", "sdb",
                                             "--socket", sock))
        assert "in use" in line
        r = subprocess.run(["nbdcopy", s.uri, "null:"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr  # the first server is unharmed
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        line = assert_one_line_error(run_cli("serve", bid, "--repo", repo.path, "--disk", "sda",
                                             "--port", str(busy.getsockname()[1])))
        assert "in use" in line
    # a stale socket file (its server died) is replaced, not refused
    stale = short_dir / "stale.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(stale))
    srv.close()
    with serving(repo.path, bid, "--disk", "sda", "--socket", str(stale)) as s:
        assert Path(s.info["socket"]) == stale.resolve()


def test_corrupt_chunk_fails_that_read_with_eio_and_one_log_line(
    backed_up: tuple[Repository, str, Path], short_dir: Path
) -> None:
    repo, bid, img = backed_up
    idx = repo.load_index(bid, "sda")
    mask = idx.nonzero_mask()
    nz = [i for i in range(len(idx)) if mask[i]]
    bad = nz[len(nz) // 2]
    cid = idx.get(bad)
    flip_blob(repo, cid)
    uses = {i for i in nz if idx.get(i) == cid}
    good = next(i for i in nz if i not in uses)
    with serving(repo.path, bid, "--disk", "sda", "--socket", str(short_dir / "c.sock")) as s:
        r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", f"read {bad * CS} 4096", s.uri],
                           capture_output=True, text=True)
        assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
        r = subprocess.run(["nbdcopy", s.uri, "null:"], capture_output=True, text=True)
        assert r.returncode != 0
        # other data still reads fine, from the same server
        want = img.read_bytes()[good * CS : good * CS + 65536]
        out = short_dir / "good.raw"
        r = subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={s.uri}",
                            f"of={out}", "bs=65536", f"skip={good * CS // 65536}", "count=1"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == want
        assert s.proc.poll() is None, "the server must survive a bad chunk"
    log = [ln for ln in s.stderr.splitlines() if ln.strip()]
    assert len(log) >= 1 and all(ln.startswith("snapferry serve: ") for ln in log), s.stderr
    assert len({ln.split(" failed with EIO")[1] for ln in log}) == 1, log  # one chunk named
    assert cid.hex() in log[0] and "EIO" in log[0]
    assert "Traceback" not in s.stderr


def test_sigkill_of_serve_while_qemu_reads_then_served_again(
    backed_up: tuple[Repository, str, Path], short_dir: Path, tmp_path: Path
) -> None:
    """``snapferry serve --socket`` SIGKILLed while QEMU's NBD client (``qemu-img
    convert`` with ``reconnect-delay``, as the instant VM's backing uses) reads from it:
    its nbdkit is detached and keeps serving (still holding the lock), the reader does
    not notice; ``serve`` again on that socket says it takes over, replaces that nbdkit
    (QEMU reconnects) and the read completes byte-exact; nothing is left after it."""
    repo, bid, img = backed_up
    before = _fingerprint(repo.path)
    sock = short_dir / "s.sock"
    spec = {"driver": "raw", "file": {"driver": "nbd", "reconnect-delay": 30,
                                      "server": {"type": "unix", "path": str(sock)}}}
    out = tmp_path / "copied.raw"
    first = start_serve(repo.path, bid, "--disk", "sda", "--socket", str(sock))
    orphan = int(first.info["pid"])
    reader = subprocess.Popen(["qemu-img", "convert", "-r", "4M", "-f", "raw", "-O", "raw",
                               "json:" + json.dumps(spec), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (not out.exists() or out.stat().st_blocks == 0) and time.monotonic() < deadline:
            assert reader.poll() is None, reader.communicate()
            time.sleep(0.05)
        assert reader.poll() is None, "the copy must still be running when serve is killed"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.communicate(timeout=30)
        time.sleep(1.0)
        assert pid_alive(orphan), "the detached nbdkit keeps serving"
        held = [json.loads(p.read_text()) for p in (repo.path / "locks").glob("*")]
        assert [h["pid"] for h in held] == [orphan], "and keeps holding the shared lock"
        assert reader.poll() is None
        second = start_serve(repo.path, bid, "--disk", "sda", "--socket", str(sock))
        try:
            assert not pid_alive(orphan)
            _, err = reader.communicate(timeout=120)
            assert reader.returncode == 0, err
        finally:
            code = second.stop()
        assert code == 0, second.stderr
        assert second.stderr.strip() == f"snapferry: took over {sock} from nbdkit pid " \
            f"{orphan}, left serving by a killed snapferry", second.stderr
        assert not pid_alive(int(second.info["pid"]))
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.communicate()
        if pid_alive(orphan):
            os.kill(orphan, signal.SIGKILL)
    assert out.read_bytes() == img.read_bytes()
    assert _fingerprint(repo.path) == before
    assert not list((repo.path / "locks").glob("*")), "no lock left, stale or live"
    assert not sock.exists()
