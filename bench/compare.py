"""Side-by-side macro benchmark: snapferry against nbdcopy, zstd, restic and borg.

One run builds one deterministic disk image, applies a "1 % change" through QEMU (so a
persistent dirty bitmap records it), serves both states with qemu-nbd, times every tool
on the same bytes with the page cache warm, prints one table plus the project's goal
checks, and writes everything as JSON. See bench/README.md for how to read it.

    .venv/bin/python bench/compare.py [--size 2G] [--out bench/out/compare.json]
        [--workdir DIR] [--skip restic,borg] [--repeat N] [--profile]
        [--tree DIR[,DIR...]] [--images generated,tree]

``--tree`` builds a second image from real files (``mke2fs -t ext4 -d``, the directories
hard-linked or copied into one staging tree) and ``--images`` picks which images run;
every row also reports the user and system CPU time and the peak RSS of the tool's
process tree (``wait4``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from imagegen import UNIT, ContentGenerator, make_bench_image  # noqa: E402

BITMAP = "sfbench"
GB = 1e9
SNAPFERRY_OPS = ("full", "incremental", "restore")


class BenchError(Exception):
    """A benchmark step failed; main() prints it as one line."""


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One timed operation of one tool."""

    tool: str
    operation: str
    key: str  # stable id, e.g. "restic.incremental"
    compare_to: str | None  # the snapferry operation this row is measured against
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    seconds: float | None = None
    runs: list[float] = field(default_factory=list)
    virtual_bytes: int = 0
    read_bytes: int | None = None
    stored_bytes: int | None = None
    ratio: float | None = None  # seconds / seconds of the snapferry operation
    gbps_virtual: float | None = None
    gbps_read: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    usage: list[tuple[float, float, int]] = field(default_factory=list)  # user, sys, KiB
    user_seconds: float | None = None
    sys_seconds: float | None = None
    peak_rss_kib: int | None = None

    def took(self, seconds: float) -> None:
        """One timed run; its CPU and memory come from the ``run`` just made."""
        self.runs.append(seconds)
        self.usage.append(LAST_USAGE[0])

    def finish(self) -> None:
        if self.runs:
            self.seconds = min(self.runs)
            if len(self.usage) == len(self.runs):
                u = self.usage[self.runs.index(self.seconds)]
                self.user_seconds, self.sys_seconds = round(u[0], 3), round(u[1], 3)
                self.peak_rss_kib = max(x[2] for x in self.usage)
        if self.seconds and self.seconds > 0:
            self.gbps_virtual = self.virtual_bytes / self.seconds / GB
            if self.read_bytes is not None:
                self.gbps_read = self.read_bytes / self.seconds / GB


@dataclass
class Goal:
    name: str
    target: str
    value: float | None
    passed: bool | None  # None: could not be judged (a row was skipped or failed)
    detail: str = ""


# --------------------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 64M, 2G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    size = int(float(m.group(1)) * mult) // UNIT * UNIT
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is below 64 KiB")
    return size


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
LAST_USAGE: list[tuple[float, float, int]] = [(0.0, 0.0, 0)]
"""(user s, sys s, peak RSS KiB) of the last ``run``'s process tree."""


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise BenchError with its last stderr line. Its CPU
    time and peak RSS (``wait4``: the child and the descendants it waited for) go to
    ``LAST_USAGE``."""
    # Peak RSS through GNU time (a small process forks the tool: a child forked straight
    # from this big Python process would report this process's RSS as its own peak).
    rss_file = None
    argv = list(cmd)
    if GNU_TIME:
        fd, rss_file = tempfile.mkstemp(prefix="sfbench-rss-")
        os.close(fd)
        argv = [GNU_TIME, "-q", "-f", "%M", "-o", rss_file, *argv]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=cwd)
    got: dict[str, str] = {}

    def drain(name: str, stream: Any) -> None:
        got[name] = stream.read()

    threads = [threading.Thread(target=drain, args=(n, st), daemon=True)
               for n, st in (("out", p.stdout), ("err", p.stderr))]
    for t in threads:
        t.start()
    _pid, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    for st in (p.stdout, p.stderr):
        if st is not None:
            st.close()
    proc = subprocess.CompletedProcess(list(cmd), p.returncode, got.get("out", ""),
                                       got.get("err", ""))
    peak = 0
    if rss_file is not None:
        try:
            peak = int(Path(rss_file).read_text().split()[-1])
        except (OSError, ValueError, IndexError):
            peak = 0
        Path(rss_file).unlink(missing_ok=True)
    LAST_USAGE[0] = (ru.ru_utime, ru.ru_stime, peak)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        last = lines[-1] if lines else ""
        raise BenchError(f"{Path(cmd[0]).name} exited {proc.returncode}: {last}")
    return proc


def timed(cmd: Sequence[str], **kw: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = run(cmd, **kw)
    return time.perf_counter() - t0, proc


def tree_bytes(path: Path) -> int:
    """Apparent size of every file under ``path`` (what a repository stores)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def warm(path: Path) -> None:
    """Read a file once so the timed runs see a warm page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


def version_of(cmd: Sequence[str]) -> str:
    if not shutil.which(cmd[0]):
        return "not installed"
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = ""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "memory": mem.split(":", 1)[-1].strip(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _snapferry_version() -> str:
    try:
        from importlib.metadata import version

        v = version("snapferry")
    except Exception:  # not installed as a distribution
        v = "unknown"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno"],
                           capture_output=True, text=True)
    if head.returncode == 0:
        v += f" (git {head.stdout.strip()}{'+changes' if dirty.stdout.strip() else ''})"
    return v


def tool_versions() -> dict[str, str]:
    return {
        "snapferry": _snapferry_version(),
        "qemu-img": version_of(["qemu-img", "--version"]),
        "qemu-nbd": version_of(["qemu-nbd", "--version"]),
        "nbdcopy": version_of(["nbdcopy", "--version"]),
        "zstd": version_of(["zstd", "--version"]),
        "restic": version_of(["restic", "version"]),
        "borg": version_of(["borg", "--version"]),
        "py-spy": version_of([str(Path(sys.executable).parent / "py-spy"), "--version"]),
    }


# --------------------------------------------------------------------------- image


@dataclass
class Images:
    base_raw: Path
    base_qcow2: Path
    changed_raw: Path
    changed_qcow2: Path
    virtual_size: int
    allocated_base: int
    changed_blocks: list[int]  # offsets of the rewritten 64 KiB blocks
    content: dict[str, int]
    seconds_to_build: float


def qcow2_allocated(path: Path) -> int:
    out = run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)]).stdout
    return sum(e["length"] for e in json.loads(out) if e.get("data"))


def build_tree_image(path: Path, size: int, dirs: Sequence[str], workdir: Path) -> dict[str, int]:
    """An ext4 image of ``size`` bytes holding copies of real directories
    (``mke2fs -t ext4 -d``): hard links into one staging tree (copies across
    filesystems)."""
    if not shutil.which("mke2fs"):
        raise BenchError("--tree needs mke2fs (Debian: e2fsprogs)")
    stage = workdir / "tree-src"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    for d in dirs:
        src = Path(d)
        if not src.is_dir():
            raise BenchError(f"--tree: {d} is not a directory")
        dst = stage / (src.name or "root")
        if subprocess.run(["cp", "-al", str(src), str(dst)], capture_output=True).returncode:
            shutil.rmtree(dst, ignore_errors=True)
            run(["cp", "-a", str(src), str(dst)])
    path.unlink(missing_ok=True)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(stage), str(path), f"{size // 1024}k"])
    shutil.rmtree(stage, ignore_errors=True)
    return {"tree": os.stat(path).st_blocks * 512}


IMAGES_STAMP = "images.json"


def _reuse_images(workdir: Path, recipe: dict[str, Any]) -> Images | None:
    """The images a previous run built in ``workdir`` from the same recipe, or None."""
    try:
        st = json.loads((workdir / IMAGES_STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(st, dict) or st.get("recipe") != recipe:
        return None
    paths = [workdir / n for n in ("base.raw", "base.qcow2", "changed.raw", "changed.qcow2")]
    if not all(p.is_file() for p in paths):
        return None
    return Images(*paths, int(st["virtual_size"]), int(st["allocated_base"]),
                  [int(b) for b in st["changed_blocks"]], dict(st["content"]),
                  float(st["seconds_to_build"]))


def build_images(workdir: Path, size: int, seed: int, change_frac: float,
                 tree: Sequence[str] = ()) -> Images:
    """The base image, its 1 % change and both as qcow2 (the changed one with an enabled
    persistent bitmap). Kept in ``workdir`` with a stamp: a later run with the same
    recipe (size, seed, change, tree) reuses them instead of building them again."""
    recipe = {"size": size, "seed": seed, "change_frac": change_frac, "tree": list(tree)}
    old = _reuse_images(workdir, recipe)
    if old is not None:
        print(f"reusing the images in {workdir} ({IMAGES_STAMP} matches)", file=sys.stderr)
        return old
    (workdir / IMAGES_STAMP).unlink(missing_ok=True)
    t0 = time.perf_counter()
    base_raw = workdir / "base.raw"
    if tree:
        content = build_tree_image(base_raw, size, tree, workdir)
    else:
        content = make_bench_image(base_raw, size, seed).bytes_by_kind
    base_qcow2 = workdir / "base.qcow2"
    changed_qcow2 = workdir / "changed.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base_raw), str(base_qcow2)])
    run(["cp", "--sparse=always", str(base_qcow2), str(changed_qcow2)])
    run(["qemu-img", "bitmap", "--add", "--enable", "-f", "qcow2", str(changed_qcow2), BITMAP])

    # The "1 % change": random 64 KiB blocks rewritten through QEMU's block layer
    # (qemu-io), so the enabled persistent bitmap records every write.
    rng = np.random.default_rng(seed + 1)
    nblocks = size // UNIT
    count = max(1, round(nblocks * change_frac))
    blocks = sorted(int(b) * UNIT for b in rng.choice(nblocks, size=count, replace=False))
    gen = ContentGenerator(rng)
    patdir = workdir / "changes"
    patdir.mkdir(exist_ok=True)
    cmds: list[str] = []
    kinds = ("text", "binary", "random")
    for i, off in enumerate(blocks):
        pat = patdir / f"{off:016x}.bin"
        pat.write_bytes(gen.make(kinds[i % len(kinds)], UNIT))
        cmds.append(f"write -q -s {pat} {off} 64k")
    for i in range(0, len(cmds), 256):
        argv = ["qemu-io", "-f", "qcow2"]
        for c in cmds[i:i + 256]:
            argv += ["-c", c]
        run([*argv, str(changed_qcow2)])
    shutil.rmtree(patdir)
    changed_raw = workdir / "changed.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(changed_qcow2), str(changed_raw)])
    img = Images(base_raw, base_qcow2, changed_raw, changed_qcow2, size,
                 qcow2_allocated(base_qcow2), blocks, content, time.perf_counter() - t0)
    (workdir / IMAGES_STAMP).write_text(json.dumps({
        "recipe": recipe, "virtual_size": size, "allocated_base": img.allocated_base,
        "changed_blocks": blocks, "content": content,
        "seconds_to_build": img.seconds_to_build}))
    return img


# --------------------------------------------------------------------------- NBD


def nbd_uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


@contextmanager
def qemu_nbd(image: Path, sock: Path, bitmap: str | None = None) -> Iterator[str]:
    """Serve ``image`` read-only, persistent, 4 connections; yield its URI."""
    cmd = ["qemu-nbd", "-r", "-t", "-e", "4", f"--socket={sock}", "-f", "qcow2"]
    if bitmap:
        cmd += ["-B", bitmap]
    proc = subprocess.Popen([*cmd, str(image)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode().strip() if proc.stderr else ""
                raise BenchError(f"qemu-nbd exited: {err}")
            if sock.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(sock))
                        break
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                raise BenchError(f"qemu-nbd did not serve {sock} within 30 s")
            time.sleep(0.05)
        yield nbd_uri(sock)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def dirty_bytes(uri: str) -> int:
    out = run(["nbdinfo", f"--map=qemu:dirty-bitmap:{BITMAP}", "--json", uri]).stdout
    return sum(e["length"] for e in json.loads(out) if e["type"] & 1)


# --------------------------------------------------------------------------- the bench


@dataclass
class Options:
    size: int
    out: Path
    workdir: Path
    skip: set[str]
    repeat: int
    profile: bool
    seed: int
    change_frac: float
    chunk_size: str | None
    workers: int | None
    snapferry: str
    tree: tuple[str, ...] = ()
    compression: int | None = None
    encryption: str | None = None
    target_dir: Path | None = None

    @property
    def targets(self) -> Path:
        """Where restore and nbdcopy write their copies of the disk."""
        return self.target_dir or self.workdir


class Bench:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.rows: dict[str, Row] = {}
        self.info: dict[str, Any] = {}
        # the repository's passphrase (init's default is an encrypted repository, like
        # restic's; borg runs unencrypted)
        self.env = dict(os.environ, SNAPFERRY_PASSWORD="snapferry-bench")
        self._takes_name: bool | None = None

    # ---- row bookkeeping

    def row(self, key: str, tool: str, operation: str, compare_to: str | None,
            virtual: int) -> Row:
        r = Row(tool=tool, operation=operation, key=key, compare_to=compare_to,
                virtual_bytes=virtual)
        self.rows[key] = r
        return r

    def unavailable(self, tool: str, exe: str) -> str | None:
        if tool in self.o.skip:
            return "skipped: --skip"
        if not shutil.which(exe):
            return f"skipped: {exe} not installed"
        return None

    def guarded(self, rows: Sequence[Row], fn: Callable[[], None]) -> None:
        """Run ``fn`` that fills ``rows``; a failure marks them failed, the bench goes on."""
        try:
            fn()
        except BenchError as e:
            for r in rows:
                if not r.runs:
                    r.status, r.note = "failed", str(e)
                    print(f"  {r.tool} {r.operation}: FAILED: {e}", file=sys.stderr)

    # ---- main flow

    def run(self) -> dict[str, Any]:
        o = self.o
        self.info["load_start"] = _loadavg()
        o.workdir.mkdir(parents=True, exist_ok=True)
        kind = f"ext4 of {', '.join(o.tree)}" if o.tree else "generated"
        print(f"building a {o.size / 2**30:.2f} GiB {kind} image in {o.workdir} ...",
              file=sys.stderr)
        img = build_images(o.workdir, o.size, o.seed, o.change_frac, o.tree)
        self.info["image_kind"] = kind
        for p in (img.base_raw, img.changed_raw, img.base_qcow2, img.changed_qcow2):
            warm(p)
        with qemu_nbd(img.base_qcow2, o.workdir / "base.sock") as base_uri, \
                qemu_nbd(img.changed_qcow2, o.workdir / "changed.sock", BITMAP) as chg_uri:
            bitmap_bytes = dirty_bytes(chg_uri)
            if bitmap_bytes != len(img.changed_blocks) * UNIT:
                raise BenchError(
                    f"dirty bitmap holds {bitmap_bytes} bytes, expected "
                    f"{len(img.changed_blocks) * UNIT}: qemu-io did not record the change")
            if shutil.which("nbdcopy"):  # untimed read through each export: warm cache
                run(["nbdcopy", base_uri, "null:"])
                run(["nbdcopy", chg_uri, "null:"])
            self.info["image"] = {
                "virtual_size": img.virtual_size,
                "allocated_bytes": img.allocated_base,
                "bytes_by_kind": img.content,
                "changed_blocks": len(img.changed_blocks),
                "changed_bytes": len(img.changed_blocks) * UNIT,
                "bitmap_dirty_bytes": bitmap_bytes,
                "seed": o.seed,
                "build_seconds": round(img.seconds_to_build, 2),
            }
            print("timing snapferry ...", file=sys.stderr)
            self.bench_snapferry(img, base_uri, chg_uri)
            print("timing nbdcopy ...", file=sys.stderr)
            self.bench_nbdcopy(img, base_uri)
            if o.profile:
                print("profiling a snapferry full backup ...", file=sys.stderr)
                self.profile_full(base_uri)
        print("timing zstd, restic, borg ...", file=sys.stderr)
        self.bench_zstd(img)
        self.bench_restic(img)
        self.bench_borg(img)
        for r in self.rows.values():
            r.finish()
        self.fill_ratios()
        goals = self.goals(img)
        return {
            "machine": machine_info(),
            "versions": tool_versions(),
            "settings": {
                "size": o.size, "repeat": o.repeat, "seed": o.seed,
                "change_frac": o.change_frac, "chunk_size": o.chunk_size,
                "workers": o.workers, "skip": sorted(o.skip), "page_cache": "warm",
                "compression": o.compression, "encryption": o.encryption or "default",
                "target_dir": str(o.targets),
            },
            "load_average": {"start": self.info.pop("load_start", None),
                             "end": _loadavg()},
            **self.info,
            "rows": [asdict(r) for r in self.rows.values()],
            "goals": [asdict(g) for g in goals],
        }

    # ---- snapferry

    def sf(self, *args: str) -> dict[str, Any]:
        proc = run([self.o.snapferry, *args], env=self.env)
        try:
            obj = json.loads(proc.stdout)
        except json.JSONDecodeError as e:
            raise BenchError(f"snapferry {args[0]} --json printed no JSON object: {e}") from e
        if not isinstance(obj, dict):
            raise BenchError(f"snapferry {args[0]} --json printed {type(obj).__name__}")
        return obj

    def sf_init(self, repo: Path) -> None:
        cmd = [self.o.snapferry, "init", str(repo)]
        if self.o.chunk_size:
            cmd += ["--chunk-size", self.o.chunk_size]
        if self.o.compression is not None:
            cmd += ["--compression", str(self.o.compression)]
        if self.o.encryption:
            cmd += ["--encryption", self.o.encryption]
        run(cmd, env=self.env)

    def sf_backup_args(self, uri: str, repo: Path) -> list[str]:
        args = ["backup", uri, "--repo", str(repo), "--json"]
        if self._backup_takes_name():
            # Both exports must count as the same disk for --parent to apply.
            args += ["--name", "sfbench-disk"]
        if self.o.workers:
            args += ["--workers", str(self.o.workers)]
        return args

    def _backup_takes_name(self) -> bool:
        if self._takes_name is None:
            proc = subprocess.run([self.o.snapferry, "backup", "--help"],
                                  capture_output=True, text=True)
            self._takes_name = "--name" in proc.stdout
        return self._takes_name

    def bench_snapferry(self, img: Images, base_uri: str, chg_uri: str) -> None:
        size = img.virtual_size
        full = self.row("snapferry.full", "snapferry", "full backup (NBD)", "full", size)
        inc = self.row("snapferry.incremental", "snapferry",
                       f"incremental (--bitmap {BITMAP})", "incremental", size)
        rst = self.row("snapferry.restore", "snapferry", "restore incremental -> raw",
                       "restore", size)
        why = self.unavailable("snapferry", self.o.snapferry)
        if why:
            for r in (full, inc, rst):
                r.status, r.note = "skipped", why
            return

        def go() -> None:
            for i in range(self.o.repeat):
                repo = self.o.workdir / f"sf-repo-{i}"
                shutil.rmtree(repo, ignore_errors=True)
                self.sf_init(repo)
                empty = tree_bytes(repo)
                t0 = time.perf_counter()
                j = self.sf(*self.sf_backup_args(base_uri, repo))
                full.took(time.perf_counter() - t0)
                after_full = tree_bytes(repo)
                full.stored_bytes = after_full - empty
                full.read_bytes = _disk_sum(j, "bytes_read")
                full.extra = {"json": j}
                full_id = str(j["backup_id"])

                t0 = time.perf_counter()
                j2 = self.sf(*self.sf_backup_args(chg_uri, repo), "--bitmap", BITMAP,
                             "--parent", full_id)
                inc.took(time.perf_counter() - t0)
                inc.stored_bytes = tree_bytes(repo) - after_full
                inc.read_bytes = _disk_sum(j2, "bytes_read")
                inc.extra = {"json": j2, "chunk_size": _chunk_size(repo, j2, self.o.chunk_size)}
                if j2.get("mode") not in (None, "incremental"):
                    inc.note = f"snapferry reported mode {j2.get('mode')!r}"

                out = self.o.targets / "restored.raw"
                out.unlink(missing_ok=True)
                t0 = time.perf_counter()
                j3 = self.sf("restore", "--repo", str(repo), str(j2["backup_id"]),
                             "--to", str(out), "--format", "raw", "--json")
                rst.took(time.perf_counter() - t0)
                same = subprocess.run(["cmp", "-s", str(out), str(img.changed_raw)]).returncode
                rst.extra = {"json": j3, "cmp_ok": same == 0}
                rst.read_bytes = None
                out.unlink(missing_ok=True)
                if i + 1 < self.o.repeat:
                    shutil.rmtree(repo, ignore_errors=True)
            self.info["restore_cmp_ok"] = bool(rst.extra.get("cmp_ok"))
            if not rst.extra.get("cmp_ok"):
                rst.note = "restored image differs from the changed image (cmp)"

        self.info["restore_cmp_ok"] = None
        self.guarded([full, inc, rst], go)

    def profile_full(self, base_uri: str) -> None:
        pyspy = Path(sys.executable).parent / "py-spy"
        if not pyspy.exists() and not shutil.which("py-spy"):
            self.info["profile"] = {"status": "skipped: py-spy not installed "
                                    "(.venv/bin/pip install py-spy)"}
            return
        exe = str(pyspy) if pyspy.exists() else "py-spy"
        repo = self.o.workdir / "sf-repo-profile"
        shutil.rmtree(repo, ignore_errors=True)
        raw = self.o.out.with_suffix(".profile.txt")
        # --nonblocking: sample without pausing the processes (less perturbation).
        # py-spy occasionally fails when a sampled worker exits: one retry.
        for _attempt in range(2):
            shutil.rmtree(repo, ignore_errors=True)
            raw.unlink(missing_ok=True)
            try:
                self.sf_init(repo)
                proc = subprocess.run(
                    [exe, "record", "--subprocesses", "--nonblocking", "--format", "raw",
                     "--rate", "200", "--output", str(raw), "--", self.o.snapferry,
                     *self.sf_backup_args(base_uri, repo)],
                    env=self.env, capture_output=True, text=True)
            except BenchError as e:
                self.info["profile"] = {"status": f"failed: {e}"}
                return
            finally:
                shutil.rmtree(repo, ignore_errors=True)
            if proc.returncode == 0 and raw.exists():
                break
        if proc.returncode != 0 or not raw.exists():
            self.info["profile"] = {"status": f"failed: py-spy exited {proc.returncode}",
                                    "stderr": proc.stderr[-4000:]}
            return
        self.info["profile"] = {"status": "ok", "collapsed_stacks": str(raw),
                                **summarize_profile(raw)}

    # ---- nbdcopy

    def bench_nbdcopy(self, img: Images, base_uri: str) -> None:
        size = img.virtual_size
        null = self.row("nbdcopy.null", "nbdcopy", "NBD -> null: (raw transfer)", "full", size)
        tofile = self.row("nbdcopy.file", "nbdcopy", "NBD -> file.raw", "restore", size)
        flushed = self.row("nbdcopy.file_flush", "nbdcopy", "NBD -> file.raw --flush",
                           "restore", size)
        why = self.unavailable("nbdcopy", "nbdcopy")
        if why:
            for r in (null, tofile, flushed):
                r.status, r.note = "skipped", why
            return
        null.read_bytes = tofile.read_bytes = flushed.read_bytes = img.allocated_base
        out = self.o.targets / "nbdcopy.raw"

        def go() -> None:
            for _ in range(self.o.repeat):
                null.took(timed(["nbdcopy", base_uri, "null:"])[0])
                out.unlink(missing_ok=True)
                tofile.took(timed(["nbdcopy", base_uri, str(out)])[0])
                out.unlink(missing_ok=True)
                # durable like ``snapferry restore`` (which fdatasyncs before its rename)
                flushed.took(timed(["nbdcopy", "--flush", base_uri, str(out)])[0])
                out.unlink(missing_ok=True)

        self.guarded([null, tofile, flushed], go)

    # ---- zstd

    def bench_zstd(self, img: Images) -> None:
        r = self.row("zstd.full", "zstd", "-T0 -3 over the raw image", "full", img.virtual_size)
        why = self.unavailable("zstd", "zstd")
        if why:
            r.status, r.note = "skipped", why
            return
        r.read_bytes = img.virtual_size
        out = self.o.workdir / "base.raw.zst"

        def go() -> None:
            for _ in range(self.o.repeat):
                r.took(timed(["zstd", "-T0", "-3", "-q", "-f", str(img.base_raw),
                                     "-o", str(out)])[0])
                r.stored_bytes = out.stat().st_size
                out.unlink()

        self.guarded([r], go)

    # ---- restic and borg: back up one path, first holding the base, then the changed image

    def _stage(self, name: str, image: Path) -> Path:
        src = self.o.workdir / f"{name}-src"
        src.mkdir(exist_ok=True)
        link = src / "disk.raw"
        link.unlink(missing_ok=True)
        os.link(image, link)
        return src

    def bench_restic(self, img: Images) -> None:
        size = img.virtual_size
        full = self.row("restic.full", "restic", "backup (repo v2, zstd auto)", "full", size)
        inc = self.row("restic.incremental", "restic", "backup of the changed image",
                       "incremental", size)
        why = self.unavailable("restic", "restic")
        if why:
            for r in (full, inc):
                r.status, r.note = "skipped", why
            return
        env = dict(self.env, RESTIC_PASSWORD="snapferry-bench",
                   RESTIC_CACHE_DIR=str(self.o.workdir / "restic-cache"))
        full.read_bytes = inc.read_bytes = size

        def go() -> None:
            for i in range(self.o.repeat):
                repo = self.o.workdir / f"restic-repo-{i}"
                shutil.rmtree(repo, ignore_errors=True)
                run(["restic", "-r", str(repo), "init", "--repository-version", "2"], env=env)
                empty = tree_bytes(repo)
                backup = ["restic", "-r", str(repo), "backup", "-q", "--host", "bench",
                          "disk.raw"]
                src = self._stage("restic", img.base_raw)
                full.took(timed(backup, env=env, cwd=src)[0])
                after = tree_bytes(repo)
                full.stored_bytes = after - empty
                src = self._stage("restic", img.changed_raw)
                inc.took(timed(backup, env=env, cwd=src)[0])
                inc.stored_bytes = tree_bytes(repo) - after
                shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(self.o.workdir / "restic-src", ignore_errors=True)

        self.guarded([full, inc], go)

    def bench_borg(self, img: Images) -> None:
        size = img.virtual_size
        full = self.row("borg.full", "borg", "create --compression zstd,3", "full", size)
        inc = self.row("borg.incremental", "borg", "create of the changed image",
                       "incremental", size)
        why = self.unavailable("borg", "borg")
        if why:
            for r in (full, inc):
                r.status, r.note = "skipped", why
            return
        env = dict(self.env, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                   BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_PASSPHRASE="",
                   BORG_BASE_DIR=str(self.o.workdir / "borg-base"))
        full.read_bytes = inc.read_bytes = size

        def go() -> None:
            for i in range(self.o.repeat):
                repo = self.o.workdir / f"borg-repo-{i}"
                shutil.rmtree(repo, ignore_errors=True)
                run(["borg", "init", "-e", "none", str(repo)], env=env)
                empty = tree_bytes(repo)
                src = self._stage("borg", img.base_raw)
                full.took(timed(["borg", "create", "--compression", "zstd,3",
                                        f"{repo}::full", "disk.raw"], env=env, cwd=src)[0])
                after = tree_bytes(repo)
                full.stored_bytes = after - empty
                src = self._stage("borg", img.changed_raw)
                inc.took(timed(["borg", "create", "--compression", "zstd,3",
                                       f"{repo}::incremental", "disk.raw"], env=env,
                                      cwd=src)[0])
                inc.stored_bytes = tree_bytes(repo) - after
                shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(self.o.workdir / "borg-src", ignore_errors=True)

        self.guarded([full, inc], go)

    # ---- ratios and goals

    def fill_ratios(self) -> None:
        for r in self.rows.values():
            ref = self.rows.get(f"snapferry.{r.compare_to}") if r.compare_to else None
            if r.seconds and ref is not None and ref.seconds:
                r.ratio = r.seconds / ref.seconds

    def goals(self, img: Images) -> list[Goal]:
        rows = self.rows

        def secs(key: str) -> float | None:
            r = rows.get(key)
            return r.seconds if r is not None and r.status == "ok" else None

        out: list[Goal] = []

        def ratio_goal(name: str, target: str, num: float | None, den: float | None,
                       ok: Callable[[float], bool], detail: str) -> None:
            if num is None or den is None or den == 0:
                out.append(Goal(name, target, None, None, "not judged: a row is missing"))
                return
            v = num / den
            out.append(Goal(name, target, round(v, 4), ok(v), detail))

        sf_full, sf_inc, sf_rst = (secs(f"snapferry.{k}") for k in SNAPFERRY_OPS)
        ratio_goal("full_vs_zstd", "snapferry full <= 0.85x zstd -T0 -3 time",
                   sf_full, secs("zstd.full"), lambda v: v <= 0.85,
                   "snapferry full seconds / zstd seconds")
        full_r, zstd_r = rows.get("snapferry.full"), rows.get("zstd.full")
        if full_r is not None and zstd_r is not None and full_r.status == zstd_r.status == "ok":
            cpu = [(r.user_seconds or 0.0) + (r.sys_seconds or 0.0) for r in (full_r, zstd_r)]
            if cpu[1] > 0:
                out.append(Goal("full_cpu_vs_zstd", "(information) full CPU / zstd CPU",
                                round(cpu[0] / cpu[1], 4), None,
                                f"user+sys {cpu[0]:.2f} s / {cpu[1]:.2f} s"))
        level = self.o.compression
        sf_st = full_r.stored_bytes if full_r is not None and full_r.status == "ok" else None
        rs = rows.get("restic.full")
        rs_st = rs.stored_bytes if rs is not None and rs.status == "ok" else None
        if level is None or level < 19:
            out.append(Goal("stored_vs_restic", "stored <= restic's at level 19", None, None,
                            "not judged: run with --compression 19"))
        else:
            ratio_goal("stored_vs_restic", f"stored at level {level} <= restic's stored",
                       None if sf_st is None else float(sf_st),
                       None if rs_st is None else float(rs_st), lambda v: v <= 1.0,
                       f"snapferry full stored {sf_st} B / restic full stored {rs_st} B")
        ratio_goal("full_vs_restic", "snapferry full >= 2x faster than restic",
                   secs("restic.full"), sf_full, lambda v: v >= 2.0,
                   "restic full seconds / snapferry full seconds")
        ratio_goal("incremental_vs_full", "incremental <= 5 % of the full backup time",
                   sf_inc, sf_full, lambda v: v <= 0.05,
                   "snapferry incremental seconds / snapferry full seconds")
        inc = rows.get("snapferry.incremental")
        chunk = inc.extra.get("chunk_size") if inc is not None else None
        if inc is not None and inc.status == "ok" and inc.read_bytes is not None and chunk:
            bound = changed_rounded_to_chunks(img.changed_blocks, int(chunk), img.virtual_size)
            # the CBT audit's re-read clean chunks are not the tracker's change set
            audited = int(chunk) * sum(
                int((d.get("cbt_audit") or {}).get("sampled", 0))
                for d in inc.extra.get("json", {}).get("disks", []))
            ratio_goal("incremental_reads",
                       "incremental reads <= 1.1x changed bytes rounded to chunks",
                       float(inc.read_bytes - audited), float(bound), lambda v: v <= 1.1,
                       f"(bytes_read {inc.read_bytes} - {audited} audited) / {bound} "
                       f"(changed 64 KiB blocks rounded to {chunk}-byte chunks)")
            changed = len(img.changed_blocks) * UNIT
            ratio_goal("incremental_reads_vs_change",
                       "incremental reads <= 2x the changed bytes (audit left out)",
                       float(inc.read_bytes - audited), float(changed), lambda v: v <= 2.0,
                       f"(bytes_read {inc.read_bytes} - {audited} audited) / {changed} "
                       "changed bytes")
        else:
            out.append(Goal("incremental_reads",
                            "incremental reads <= 1.1x changed bytes rounded to chunks",
                            None, None, "not judged: no bytes_read or chunk size"))
        ratio_goal("incremental_vs_restic", "incremental >= 10x faster than restic's",
                   secs("restic.incremental"), sf_inc, lambda v: v >= 10.0,
                   "restic incremental seconds / snapferry incremental seconds")
        # Same virtual size on both sides, so throughput ratio = inverse time ratio.
        # Judged like for like: restore returns once the image is on stable storage
        # (fdatasync before the rename into place), so against nbdcopy --flush; the
        # ratio against nbdcopy without --flush (page cache only) is shown beside it.
        ratio_goal("restore_vs_nbdcopy",
                   "restore >= 0.9x nbdcopy-to-file throughput (both durable: --flush)",
                   secs("nbdcopy.file_flush"), sf_rst, lambda v: v >= 0.9,
                   "nbdcopy --flush NBD->file seconds / restore seconds")
        nf = secs("nbdcopy.file")
        if nf is not None and sf_rst:
            out.append(Goal("restore_vs_nbdcopy_noflush",
                            "(information) restore vs nbdcopy without --flush",
                            round(nf / sf_rst, 4), None,
                            "nbdcopy NBD->file seconds (not synced) / restore seconds "
                            "(synced)"))
        cmp_ok = self.info.get("restore_cmp_ok")
        out.append(Goal("restore_correct", "restored image == changed image (cmp)",
                        None, cmp_ok, "byte-for-byte cmp of the restore with changed.raw"))
        return out


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _disk_sum(j: dict[str, Any], key: str) -> int | None:
    disks = j.get("disks")
    if not isinstance(disks, list) or not disks:
        return None
    vals = [d.get(key) for d in disks if isinstance(d, dict)]
    return sum(int(v) for v in vals if v is not None) if any(
        v is not None for v in vals) else None


def _chunk_size(repo: Path, j: dict[str, Any], requested: str | None) -> int | None:
    """The repository's chunk size: from the JSON, the manifest, or what we asked for."""
    if isinstance(j.get("chunk_size"), int):
        return int(j["chunk_size"])
    try:  # docs/FORMAT.md: <repo>/config is JSON holding chunk_size
        cs = json.loads((repo / "config").read_text()).get("chunk_size")
        if isinstance(cs, int):
            return cs
    except (OSError, ValueError, AttributeError):
        pass
    bid = str(j.get("backup_id", ""))
    for man in repo.glob("snapshots/*"):
        if bid and bid not in str(man):
            continue
        try:
            cs = json.loads(man.read_text()).get("chunk_size")
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(cs, int):
            return cs
    return parse_size(requested) if requested else None


def changed_rounded_to_chunks(blocks: Sequence[int], chunk: int, size: int) -> int:
    """Bytes of the chunks that the changed 64 KiB blocks touch."""
    idx: set[int] = set()
    for off in blocks:
        idx.update(range(off // chunk, (off + UNIT - 1) // chunk + 1))
    return sum(min(chunk, size - i * chunk) for i in idx)


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample share per function from py-spy's collapsed stacks.

    With ``--subprocesses`` each stack starts with one ``process PID:"cmdline"`` label
    per process level (the cmdline may itself hold ';'): one label means the main
    (coordinating) process, more mean a reader-pool worker.
    """
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        levels = 0
        while m := re.match(r'process \d+:"[^"]*"(?:;|$)', stack):
            stack = stack[m.end():]
            levels += 1
        frames = [f for f in stack.split(";") if f and not f.startswith("thread (")]
        if not frames:
            continue
        count = int(n)
        total += count
        roles["workers" if levels > 1 else "main"] += count
        self_c[_frame_name(frames[-1])] += count
        for fn in set(map(_frame_name, frames)):
            incl_c[fn] += count

    def share(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": k, "share": round(v / total, 4)} for k, v in c.most_common(top)]

    return {"samples": total,
            "by_process": {k: round(v / total, 4) for k, v in roles.items()} if total else {},
            "top_self": share(self_c) if total else [],
            "top_inclusive": share(incl_c) if total else []}


def _frame_name(frame: str) -> str:
    """'compress (zstandard/__init__.py:123)' -> 'compress (zstandard/__init__.py)'."""
    return re.sub(r":\d+\)$", ")", frame.strip())


# --------------------------------------------------------------------------- output


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def render(result: dict[str, Any]) -> str:
    head = ("tool", "operation", "seconds", "vs snapferry", "GB/s virt", "GB/s read", "stored",
            "user s", "sys s", "peak MiB")
    lines: list[list[str]] = []
    notes: dict[int, str] = {}  # line index -> free text of a skipped/failed row
    for r in result["rows"]:
        if r["status"] != "ok":
            notes[len(lines)] = f"{r['status']}: {r['note']}" if r["status"] == "failed" \
                else r["note"] or r["status"]
            lines.append([r["tool"], r["operation"], "", "", "", "", "", "", "", ""])
            continue
        ratio = f"{r['ratio']:.2f}x ({r['compare_to']})" if r["ratio"] is not None else "-"
        lines.append([
            r["tool"], r["operation"], f"{r['seconds']:.2f}", ratio,
            f"{r['gbps_virtual']:.2f}" if r["gbps_virtual"] is not None else "-",
            f"{r['gbps_read']:.2f}" if r["gbps_read"] is not None else "-",
            fmt_bytes(r["stored_bytes"]),
            f"{r['user_seconds']:.2f}" if r.get("user_seconds") is not None else "-",
            f"{r['sys_seconds']:.2f}" if r.get("sys_seconds") is not None else "-",
            f"{r['peak_rss_kib'] / 1024:.0f}" if r.get("peak_rss_kib") else "-",
        ])
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    for i, ln in enumerate(lines):
        if i in notes:
            out.append("  ".join(c.ljust(w) for c, w in zip(ln[:2], widths[:2], strict=True))
                       + "  " + notes[i])
        else:
            out.append("  ".join(c.ljust(w) for c, w in zip(ln, widths, strict=True)).rstrip())
    out.append("vs snapferry = tool seconds / seconds of the snapferry operation in brackets "
               "(> 1: snapferry is faster)")
    img = result.get("image", {})
    if img:
        out.append(f"image: {fmt_bytes(img['virtual_size'])} virtual, "
                   f"{fmt_bytes(img['allocated_bytes'])} allocated, "
                   f"{img['changed_blocks']} x 64 KiB changed "
                   f"({fmt_bytes(img['changed_bytes'])}, bitmap "
                   f"{fmt_bytes(img['bitmap_dirty_bytes'])}); nproc "
                   f"{result['machine']['nproc']}")
    load = result.get("load_average") or {}
    if load:
        out.append(f"load average (1, 5, 15 min): {load.get('start')} at the start, "
                   f"{load.get('end')} at the end; settings: "
                   f"{ {k: v for k, v in result.get('settings', {}).items() if v} }")
    out.append("")
    out.append("goals:")
    for g in result["goals"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[g["passed"]]
        if g["target"].startswith("(information)"):
            mark = "info"
        val = f"{g['value']:.3f}" if g["value"] is not None else ""
        out.append(f"  [{mark}] {g['target']}: {val}  ({g['detail']})")
    prof = result.get("profile")
    if prof:
        out.append("")
        out.append(f"profile (py-spy, snapferry full backup): {prof.get('status')}; samples "
                   f"by process: {prof.get('by_process', {})}; top self time:")
        for e in prof.get("top_self", [])[:10]:
            out.append(f"  {e['share'] * 100:5.1f}%  {e['function']}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"),
                    help="virtual size of the image (default 2G)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "compare.json")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where images and repositories go (kept); default a temporary "
                         "directory that is removed")
    ap.add_argument("--skip", default="", help="comma list of: restic,borg,zstd,nbdcopy")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs")
    ap.add_argument("--profile", action="store_true",
                    help="also run a snapferry full backup under py-spy")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--change", type=float, default=0.01, dest="change_frac",
                    help="fraction of 64 KiB blocks rewritten (default 0.01)")
    ap.add_argument("--chunk-size", default=None, help="passed to snapferry init")
    ap.add_argument("--workers", type=int, default=None, help="passed to snapferry backup")
    ap.add_argument("--compression", type=int, default=None,
                    help="zstd level passed to snapferry init (19: judges stored <= restic)")
    ap.add_argument("--encryption", default=None,
                    help="passed to snapferry init (default: init's default, encrypted)")
    ap.add_argument("--snapferry", default=None, help="snapferry executable")
    ap.add_argument("--target-dir", type=Path, default=None,
                    help="where restore and nbdcopy write the disk (default: the workdir); "
                         "/dev/shm takes the disk's write speed out of the comparison")
    ap.add_argument("--tree", default="",
                    help="comma list of directories for the real-files image (mke2fs -d)")
    ap.add_argument("--images", default=None,
                    help="comma list of: generated, tree (default: generated, and tree "
                         "too when --tree is given)")
    a = ap.parse_args(argv)
    kinds = [k.strip() for k in (a.images or ("generated,tree" if a.tree else "generated"))
             .split(",") if k.strip()]
    if not kinds or set(kinds) - {"generated", "tree"}:
        ap.error("--images takes generated and/or tree")
    if "tree" in kinds and not a.tree:
        ap.error("--images tree needs --tree DIR[,DIR...]")
    a.kinds = kinds
    if a.repeat < 1:
        ap.error("--repeat must be >= 1")
    if not 0 < a.change_frac < 1:
        ap.error("--change must be between 0 and 1")
    return a


def make_options(a: argparse.Namespace, workdir: Path, kind: str = "generated") -> Options:
    exe = a.snapferry or str(Path(sys.executable).parent / "snapferry")
    if not Path(exe).exists():
        exe = shutil.which("snapferry") or exe
    tree = tuple(d.strip() for d in a.tree.split(",") if d.strip()) if kind == "tree" else ()
    return Options(size=a.size, out=a.out, workdir=workdir,
                   skip={s.strip() for s in a.skip.split(",") if s.strip()},
                   repeat=a.repeat, profile=a.profile, seed=a.seed,
                   change_frac=a.change_frac, chunk_size=a.chunk_size, workers=a.workers,
                   snapferry=exe, tree=tree, compression=a.compression,
                   encryption=a.encryption, target_dir=a.target_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"):
        if not shutil.which(tool):
            print(f"compare.py: {tool} is required (Debian: qemu-utils, libnbd-bin)",
                  file=sys.stderr)
            return 2
    tmp: str | None = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="sfbench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    results: list[dict[str, Any]] = []
    if args.workdir is not None:
        args.workdir = args.workdir.resolve()  # qemu-nbd wants absolute socket paths
    opts = make_options(args, Path(tmp) if tmp else args.workdir)
    try:
        for kind in args.kinds:
            base = Path(tmp) if tmp else args.workdir
            opts = make_options(args, base / kind if len(args.kinds) > 1 else base, kind)
            results.append(Bench(opts).run())
    except BenchError as e:
        print(f"compare.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    doc: Any = results[0] if len(results) == 1 else {"runs": results}
    opts.out.write_text(json.dumps(doc, indent=2) + "\n")
    for result in results:
        print(f"\n== {result.get('image_kind', 'generated')} image ==")
        print(render(result))
    print(f"\nJSON: {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
