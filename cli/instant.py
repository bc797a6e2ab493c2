"""``snapferry instant``: boot the lab VM straight from a restore point (placeholder)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

NAME = "instant"


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> Callable[[argparse.Namespace], int]:
    raise NotImplementedError
