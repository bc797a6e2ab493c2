"""govmomi's vCenter simulator (vCSim) for tests: built once from tests/vcsim/main.go.

The Go main is ours (a few lines around Debian's golang-github-vmware-govmomi-dev
``simulator`` package), built offline with ``GO111MODULE=off GOPATH=/usr/share/gocode``
and cached under ``~/.cache/snapferry/vcsim/<hash of main.go and go version>/``
(``SNAPFERRY_CACHE`` moves the cache). ``start_vcsim()`` runs it on 127.0.0.1 with a
free port (plain http, or https with the simulator's built-in certificate whose
thumbprints it prints) and stops it on exit. Fixtures: ``vcsim`` (http) and
``vcsim_tls`` (https), one fresh simulator per test. (PYTEST_DONT_REWRITE: test
modules import helpers from here before pytest_plugins loads it as a plugin.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

HERE = Path(__file__).resolve().parent
MAIN_GO = HERE / "vcsim" / "main.go"
GOPATH = Path("/usr/share/gocode")
SIMULATOR_PKG = GOPATH / "src/github.com/vmware/govmomi/simulator"
USER = "snapferry"
PASSWORD = "vcsim-secret"
VM0 = "DC0_H0_VM0"  # VMs of simulator.VPX(): DC0_H0_VM0, DC0_H0_VM1, DC0_C0_RP0_VM0, ...
NO_TOOLS_VM = "DC0_H0_VM1"  # started with -no-tools: its VMware Tools do not run
NO_CBT_VM = "DC0_C0_RP0_VM1"  # started with -no-cbt: no changeTrackingSupported


def _cache_root() -> Path:
    base = os.environ.get("SNAPFERRY_CACHE") or str(Path.home() / ".cache" / "snapferry")
    return Path(base) / "vcsim"


def vcsim_binary() -> Path:
    """Path of the built simulator; builds it (once, under a lock) or skips the test."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("vCSim tests need the Go toolchain (Debian package golang-go)")
    if not SIMULATOR_PKG.is_dir():
        pytest.skip(f"vCSim tests need govmomi's simulator package at {SIMULATOR_PKG} "
                    "(Debian package golang-github-vmware-govmomi-dev)")
    version = subprocess.run([go, "version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(MAIN_GO.read_bytes() + version.encode()).hexdigest()[:16]
    out_dir = _cache_root() / key
    binary = out_dir / "vcsim"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building it
        if binary.exists():
            return binary
        env = dict(os.environ, GO111MODULE="off", GOPATH=str(GOPATH), GOFLAGS="")
        tmp = out_dir / f"vcsim.tmp{os.getpid()}"
        r = subprocess.run(
            [go, "build", "-o", str(tmp), "."],
            cwd=MAIN_GO.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if r.returncode != 0:
            raise RuntimeError(f"building vCSim failed:\n{r.stdout}\n{r.stderr}")
        tmp.rename(binary)
    return binary


@dataclass(frozen=True)
class Vcsim:
    host: str
    port: int
    tls: bool
    sha1: str | None  # hex thumbprints of the served certificate (https only)
    sha256: str | None
    user: str = USER
    password: str = PASSWORD

    def uri(self, vm: str = VM0, **params: str) -> str:
        """A ``vsphere://`` URI for ``vm`` on this simulator (insecure=1 over http)."""
        query = dict(params)
        if not self.tls:
            query.setdefault("insecure", "1")
        q = f"?{urlencode(query)}" if query else ""
        return f"vsphere://{self.user}@{self.host}:{self.port}/{vm}{q}"


@contextlib.contextmanager
def start_vcsim(tmp_dir: Path, *, tls: bool = False) -> Iterator[Vcsim]:
    binary = vcsim_binary()
    args = [
        str(binary),
        "-listen", "127.0.0.1:0",
        "-user", USER,
        "-password", PASSWORD,
        "-no-tools", NO_TOOLS_VM,
        "-no-cbt", NO_CBT_VM,
    ]
    if tls:
        args.append("-tls")
    log = open(tmp_dir / "vcsim.log", "wb")  # noqa: SIM115 (closed in the finally below)
    # stdin stays open: the simulator exits as soon as it closes (even if we die).
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=tmp_dir
    )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                raise RuntimeError(f"vCSim did not start; see {tmp_dir / 'vcsim.log'}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                log.flush()
                raise RuntimeError(
                    f"vCSim exited: {(tmp_dir / 'vcsim.log').read_text(errors='replace')}"
                )
            line += chunk
        sel.close()
        info = json.loads(line)
        url = urlsplit(info["url"])
        assert url.hostname is not None and url.port is not None
        yield Vcsim(
            host=url.hostname,
            port=url.port,
            tls=tls,
            sha1=info.get("sha1"),
            sha256=info.get("sha256"),
        )
    finally:
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()


@pytest.fixture
def vcsim(tmp_path: Path) -> Iterator[Vcsim]:
    """A fresh simulator over plain http (``insecure=1``)."""
    with start_vcsim(tmp_path, tls=False) as sim:
        yield sim


@pytest.fixture
def vcsim_tls(tmp_path: Path) -> Iterator[Vcsim]:
    """A fresh simulator over https with the simulator's own certificate."""
    with start_vcsim(tmp_path, tls=True) as sim:
        yield sim


def observe_vm(sim: Vcsim, vm_name: str = VM0) -> dict[str, object]:
    """An independent look at a VM (own pyvmomi session, not snapferry's code):
    snapshot names and quiesced flags (depth first), CBT flag, consolidationNeeded."""
    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim, vmodl

    si = SmartConnect(
        protocol="https" if sim.tls else "http",
        host=sim.host,
        port=sim.port,
        user=sim.user,
        pwd=sim.password,
        disableSslCertValidation=True,
    )
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        vm = next(v for v in view.view if v.name == vm_name)
        names: list[str] = []
        quiesced: list[bool] = []

        def walk(nodes: list[object] | None) -> None:
            for n in nodes or []:
                names.append(n.name)  # type: ignore[attr-defined]
                quiesced.append(bool(n.quiesced))  # type: ignore[attr-defined]
                walk(n.childSnapshotList)  # type: ignore[attr-defined]

        # the property collector, not vm.snapshot: vCSim's Fetch of an unset property panics
        pc = content.propertyCollector
        vpc = vmodl.query.PropertyCollector
        spec = vpc.FilterSpec(
            objectSet=[vpc.ObjectSpec(obj=vm)],
            propSet=[vpc.PropertySpec(type=vim.VirtualMachine, pathSet=["snapshot"])],
        )
        for oc in pc.RetrieveContents([spec]) or []:
            for p in oc.propSet or []:
                walk(p.val.rootSnapshotList if p.val else None)
        return {
            "snapshots": names,
            "quiesced": quiesced,
            "cbt": bool(vm.config.changeTrackingEnabled),
            "consolidation_needed": bool(vm.runtime.consolidationNeeded),
            "moref": vm._moId,
        }
    finally:
        Disconnect(si)


def add_foreign_snapshot(sim: Vcsim, name: str, vm_name: str = VM0,
                         description: str = "") -> None:
    """Create a snapshot as someone else would (own pyvmomi session)."""
    from pyVim.connect import Disconnect, SmartConnect
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    si = SmartConnect(
        protocol="https" if sim.tls else "http",
        host=sim.host,
        port=sim.port,
        user=sim.user,
        pwd=sim.password,
        disableSslCertValidation=True,
    )
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        vm = next(v for v in view.view if v.name == vm_name)
        WaitForTask(vm.CreateSnapshot_Task(name=name, description=description, memory=False,
                                           quiesce=False))
    finally:
        Disconnect(si)
