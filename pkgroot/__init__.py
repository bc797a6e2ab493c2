"""snapferry: live, changed-block, deduplicated backups of running virtual machines.

The distribution installs one package, ``snapferry``, whose subpackages live in the
repository's top-level folders (see ``[tool.setuptools.package-dir]`` in pyproject.toml):

- ``snapferry.engine`` (``engine/``): the library;
- ``snapferry.native`` (``native/``): cffi bindings (libnbd, VDDK);
- ``snapferry.cli`` (``cli/``): the command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("snapferry")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0+unknown"
