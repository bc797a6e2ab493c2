"""``python -m snapferry.cli``: the same as the ``snapferry`` command."""

from __future__ import annotations

from snapferry.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
