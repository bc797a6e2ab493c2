#!/usr/bin/env bash
# ruff + mypy over the project, as tests/test_lint.py runs them.
# mypy cannot see setuptools' editable-install import hook, so it type-checks the
# package through a tree of symlinks that mirrors the installed layout
# (snapferry/ -> pkgroot/, snapferry/engine -> engine/, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
root=.venv/typing-root
mkdir -p "$root/snapferry"
here=$(pwd)
for f in __init__.py __main__.py; do ln -sfn "$here/pkgroot/$f" "$root/snapferry/$f"; done
for d in engine native cli lab; do ln -sfn "$here/$d" "$root/snapferry/$d"; done
.venv/bin/ruff check engine native cli lab pkgroot tests bench
MYPYPATH=$root .venv/bin/mypy -p snapferry
