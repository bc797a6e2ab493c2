"""Sizes for people: one unit chooser shared by the CLI, the demo and the lab.

``human_bytes(n)`` picks the unit per value (B, KiB, MiB, GiB, TiB: binary units) and
always shows one decimal past bytes, so a column of sizes reads with one precision:
``512 B``, ``16.0 KiB``, ``1.5 MiB``, ``64.0 GiB``.
"""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number below 1024."""
    value = float(n)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            # 1023.96 KiB would print as "1024.0 KiB": carry it to the next unit
            if abs(round(value, 1)) >= 1024 and unit != UNITS[-1]:
                value /= 1024
                unit = UNITS[UNITS.index(unit) + 1]
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_rate(nbytes: float, seconds: float) -> str:
    """``nbytes`` per ``seconds`` as ``12.3 MiB/s`` (``-`` when no time passed)."""
    if seconds <= 0:
        return "-"
    return f"{human_bytes(nbytes / seconds)}/s"
