"""snapferry: live, changed-block, deduplicated backups of running virtual machines.

The distribution installs one package, ``snapferry``, whose subpackages live in the
repository's top-level folders (see ``[tool.setuptools.package-dir]`` in pyproject.toml):

- ``snapferry.engine`` (``engine/``): the library;
- ``snapferry.native`` (``native/``): cffi bindings (libnbd, VDDK);
- ``snapferry.cli`` (``cli/``): the command line.
"""


def __getattr__(name: str) -> str:
    """``__version__``, looked up on first use: ``importlib.metadata`` (and the email
    package it loads) cost ~60 ms at every start of the command, which needs it only
    for ``--version``."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("snapferry")
    except PackageNotFoundError:  # running from a checkout without an install
        v = "0+unknown"
    globals()["__version__"] = v
    return v
