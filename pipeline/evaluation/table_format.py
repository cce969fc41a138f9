"""How a metric appears in a table: as a number in its column's unit (the W&B
tables) and as text (results.md). A column's kind is "pct" (a fraction shown
x100), "int" or anything else (4 decimals)."""
from __future__ import annotations


def table_value(value: float | int | None, kind: str) -> float | int | None:
    """A table cell as a number, in the unit of its column (pct x100), unrounded;
    None when undefined. The W&B tables hold these, so they sort and plot."""
    if value is None:
        return None
    if kind == "int":
        return int(value)
    if kind == "pct":
        return 100.0 * value
    return float(value)


def format_value(value: float | int | None, kind: str) -> str:
    """How a number appears in results.md ("n/a" when undefined)."""
    number = table_value(value, kind)
    if number is None:
        return "n/a"
    if kind == "int":
        return str(number)
    return f"{number:.2f}" if kind == "pct" else f"{number:.4f}"
