"""``python -m snapferry``: the same as the ``snapferry`` command."""

from snapferry.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
