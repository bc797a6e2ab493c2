"""The CLI loads only what the command it runs uses: `snapferry --help` loads no store
(numpy, zstd, crypto) and no hypervisor or object-store client, and a backup of a plain
file loads neither boto3 nor libvirt nor pyVmomi (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import cli_env, run_cli

CLIENTS = ("boto3", "botocore", "libvirt", "pyVmomi")
STORE = ("numpy", "zstandard", "cryptography")

# at exit: the CLI ends the process itself (no interpreter teardown), after the atexit
# handlers
PROBE = """
import atexit, runpy, sys
sys.argv = ["snapferry", *sys.argv[1:]]
atexit.register(lambda: print("LOADED", " ".join(sorted(m for m in sys.modules
                                                        if "." not in m)), file=sys.stderr))
runpy.run_module("snapferry", run_name="__main__")
"""


def loaded(*args: str | Path) -> set[str]:
    p = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                       text=True, env=cli_env())
    assert p.returncode == 0, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("LOADED ")]
    return set(line.split()[1:])


def test_help_loads_no_store_and_no_clients() -> None:
    for args in (["--help"], ["backup", "--help"], ["init", "--help"]):
        mods = loaded(*args)
        assert "snapferry" in mods
        assert not mods & {*CLIENTS, *STORE}, (args, mods & {*CLIENTS, *STORE})


def test_plain_file_backup_loads_no_hypervisor_or_s3_client(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert run_cli("init", repo).returncode == 0
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x5a" * (1 << 20))
    mods = loaded("backup", disk, "--repo", repo, "--quiet")
    assert "numpy" in mods  # the probe does see what a backup loads
    assert not mods & set(CLIENTS), mods & set(CLIENTS)
