#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh Debian 12 machine:
#   - the Debian packages snapferry and its tests use (QEMU, NBD tools, the lab VM's
#     kernel and busybox, the reference tools the benchmark compares against, Go and
#     govmomi for the vSphere simulator, Ceph for the S3 tests: mon, osd and radosgw,
#     libvirtd and the headers libvirt-python builds on),
#   - a virtualenv at .venv with snapferry installed (editable) and its dev tools.
# Re-running it is cheap: nothing is installed twice.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    qemu-system-x86 qemu-utils qemu-guest-agent
    libnbd0 libnbd-bin nbdkit nbdkit-plugin-python fuse3
    linux-image-amd64 busybox-static e2fsprogs cpio kmod
    zstd restic borgbackup
    golang-go golang-github-vmware-govmomi-dev
    gcc libc6-dev python3-venv
    radosgw ceph-mon ceph-osd ceph-common
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
            PY=$cand; break
        fi
    done
fi
if [[ -z "$PY" ]]; then
    echo "setup: Python 3.11 or newer is needed (apt-get install python3 python3-venv on Debian 12)" >&2
    exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $PY" >&2
    "$PY" -m venv .venv || { echo "setup: python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
fi
stamp=.venv/.snapferry-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "setup: installing snapferry into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,s3,libvirt]"
    touch "$stamp"
fi

# The editable install runs snapferry from this tree: compile it here, so that no
# command (nor any reader-pool worker it spawns) compiles every module from source
# where PYTHONDONTWRITEBYTECODE is set (~0.2 s a process). Up-to-date files are skipped.
# libnbd's declarations parsed once here, not at every start (native/ffi_build.py).
.venv/bin/python -m snapferry.native.ffi_build >/dev/null
.venv/bin/python -m compileall -q -j 0 pkgroot engine native cli lab >/dev/null
