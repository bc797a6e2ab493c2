"""The ``Backend`` contract: the same tests over every implementation.

To add a backend (an object store later), add one factory to ``BACKENDS``: a function
taking pytest's ``tmp_path`` and returning a fresh, empty backend (skip with a clear
reason when its service is absent). Everything below must then pass unchanged.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapferry.engine.errors import RepositoryError
from snapferry.engine.store.backend import Backend, ObjectMissing
from snapferry.engine.store.backends.local import LocalBackend


def _local(tmp_path: Path) -> Backend:
    return LocalBackend(str(tmp_path / "repo"), create=True)


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "local": _local,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = BACKENDS[request.param](tmp_path)
    yield b
    b.close()


def test_declares_its_properties(backend: Backend) -> None:
    p = backend.properties
    assert p.max_connections >= 1
    assert isinstance(p.atomic_create_if_absent, bool)
    assert p.durable_save or p.needs_sync, "some way to make saves durable"
    assert isinstance(backend, Backend)


def test_save_load_stat_whole_and_ranges(backend: Backend) -> None:
    data = bytes(range(256)) * 40
    assert backend.save("data", "ab" + "0" * 62, data) is True
    name = "ab" + "0" * 62
    assert backend.load("data", name) == data
    assert backend.load("data", name, 10, 5) == data[10:15]
    assert backend.load("data", name, len(data) - 3, 100) == data[-3:]
    assert backend.load("data", name, len(data) + 10, 4) == b""
    info = backend.stat("data", name)
    assert info is not None and info.size == len(data) and info.name == name
    assert backend.stat("data", "cd" + "0" * 62) is None


def test_create_if_absent_never_overwrites(backend: Backend) -> None:
    assert backend.save("snapshots", "p1", b"first") is True
    assert backend.save("snapshots", "p1", b"second") is False
    assert backend.load("snapshots", "p1") == b"first"


def test_missing_object_is_objectmissing(backend: Backend) -> None:
    with pytest.raises(ObjectMissing):
        backend.load("index", "nothing-here")
    with pytest.raises(RepositoryError):
        backend.load("data", "ff" * 32)


def test_list_by_kind_and_prefix(backend: Backend) -> None:
    names = ["aa" + "1" * 62, "aa" + "2" * 62, "bb" + "3" * 62]
    for n in names:
        backend.save("data", n, n.encode())
    backend.save("index", "i1", b"x")
    backend.save("locks", "shared-1", b"{}")
    assert sorted(i.name for i in backend.objects("data")) == sorted(names)
    assert sorted(i.name for i in backend.objects("data", "aa")) == names[:2]
    assert [i.name for i in backend.objects("data", "bb3")] == names[2:]
    assert {i.size for i in backend.objects("data")} == {64}
    assert [i.name for i in backend.objects("index")] == ["i1"]
    assert [i.name for i in backend.objects("damaged")] == []
    assert [i.name for i in backend.objects("locks", "shared-")] == ["shared-1"]


def test_remove_is_idempotent(backend: Backend) -> None:
    backend.save("locks", "exclusive-1", b"{}")
    backend.remove("locks", "exclusive-1")
    backend.remove("locks", "exclusive-1")
    assert backend.stat("locks", "exclusive-1") is None
    assert list(backend.objects("locks")) == []
    # a removed object can be created again (locks are)
    assert backend.save("locks", "exclusive-1", b"{}") is True


def test_bad_names_and_kinds_refused(backend: Backend) -> None:
    for name in ("", "../x", "a/b", ".hidden", "x" * 300):
        with pytest.raises(ValueError):
            backend.save("index", name, b"x")
    with pytest.raises(ValueError):
        backend.save("chunks", "x", b"x")


def test_sync_and_empty_objects(backend: Backend) -> None:
    backend.save("index", "empty", b"")
    backend.sync()
    assert backend.load("index", "empty") == b""
    assert backend.leftovers() == []


def _race(spec: object, n: int, q: mp.Queue) -> None:  # type: ignore[type-arg]
    b = spec.open()  # type: ignore[attr-defined]
    q.put((n, b.save("snapshots", "race", f"writer {n}".encode())))


def test_spec_reopens_in_another_process_and_one_creator_wins(backend: Backend) -> None:
    spec = pickle.loads(pickle.dumps(backend.spec()))
    if not backend.properties.atomic_create_if_absent:
        pytest.skip("backend does not declare atomic create-if-absent")
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_race, args=(spec, n, q)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = dict(q.get(timeout=5) for _ in procs)
    winners = [n for n, won in results.items() if won]
    assert len(winners) == 1
    assert backend.load("snapshots", "race") == f"writer {winners[0]}".encode()


def test_local_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        b = LocalBackend(str(tmp_path / "r"), create=True)
        b.save("data", "ab" + "0" * 62, b"x")
        b.save("config", "config", b"{}")
    finally:
        os.umask(old)
    root = tmp_path / "r"
    assert (root.stat().st_mode & 0o777) == 0o700
    assert ((root / "data").stat().st_mode & 0o777) == 0o700
    assert ((root / "data" / "ab").stat().st_mode & 0o777) == 0o700
    assert ((root / "data" / "ab" / ("ab" + "0" * 62)).stat().st_mode & 0o777) == 0o600
    assert ((root / "config").stat().st_mode & 0o777) == 0o600


def test_local_refuses_symlinks_inside(tmp_path: Path) -> None:
    root = tmp_path / "r"
    b = LocalBackend(str(root), create=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "snapshots").symlink_to(elsewhere)
    (root / "data").mkdir()
    (root / "data" / "ab").symlink_to(elsewhere)
    (root / "index").mkdir()
    (elsewhere / "target").write_bytes(b"secret")
    (root / "index" / "lnk").symlink_to(elsewhere / "target")
    b2 = LocalBackend(str(root))
    with pytest.raises(RepositoryError, match="symbolic link"):
        b2.save("snapshots", "x", b"x")
    with pytest.raises(RepositoryError, match="symbolic link"):
        b2.save("data", "ab" + "0" * 62, b"x")
    with pytest.raises(RepositoryError, match="symbolic link"):
        b2.load("index", "lnk")
    assert [i.name for i in b2.objects("index")] == []
    assert list(elsewhere.iterdir()) == [elsewhere / "target"]
    b.close()
    b2.close()


def test_local_leftovers_reported_and_removable(tmp_path: Path) -> None:
    b = LocalBackend(str(tmp_path / "r"), create=True)
    b.save("data", "ab" + "0" * 62, b"x")
    (tmp_path / "r" / "data" / "ab" / ".tmp-abc-1-2").write_bytes(b"partial")
    left = b.leftovers()
    assert [(i.name, i.size) for i in left] == [(".tmp-abc-1-2", 7)]
    b.remove_leftover(left[0])
    assert b.leftovers() == []
