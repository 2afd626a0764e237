"""Number formats and markdown tables for every report the pipeline writes.

One place for how a number looks in ``*_REPORT.md`` files, so the reports agree and a
change of style is one edit. CSV files go through :func:`microbead_io.atomic_write_csv`;
:func:`csv_rows` gives it rows whose floats are written the one CSV way (``.6g``, NaN and
inf as empty cells).

Each report keeps its own precision through the arguments:

* ``style="sig"``: ``digits`` significant digits (``0.1235``), the default;
* ``style="fixed"``: ``digits`` decimals (``0.124``);
* ``None``, NaN and inf become ``missing`` (``"n/a"``); booleans ``yes`` / ``no``;
  integers are written whole.

>>> fmt(0.123456), fmt(0.123456, 2, style="fixed"), fmt(None), fmt(True), fmt(7)
('0.123', '0.12', 'n/a', 'yes', '7')
>>> print(md_table(["a", "b"], [[1, "x|y"]]))
| a | b |
|---|---|
| 1 | x\\|y |
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["fmt", "md_table", "md_dict_table", "csv_cell", "csv_rows"]


def fmt(value, digits: int = 3, *, style: str = "sig", missing: str = "n/a",
        big: float | None = None) -> str:
    """``value`` as report text (see the module docstring for the rules).

    Parameters
    ----------
    value : number, bool, str or None
        Strings other than numbers are returned unchanged (``""`` counts as missing).
    digits : int
        Significant digits (``style="sig"``) or decimals (``style="fixed"``).
    style : {"sig", "fixed"}
    missing : str
        Text for None, ``""``, NaN and inf.
    big : float, optional
        With ``style="sig"``: values with ``abs(value) >= big`` are written as whole numbers
        (``12345`` rather than ``1.23e+04``).
    """
    if style not in ("sig", "fixed"):
        raise ValueError(f"style must be 'sig' or 'fixed', not {style!r}")
    if value is None or (isinstance(value, str) and value == ""):
        return missing
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, str):
        return value
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return missing
    if style == "fixed":
        return f"{x:.{digits}f}"
    if big is not None and abs(x) >= big:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _cell(v) -> str:
    return str(v).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table: ``header`` then one line per row; ``|`` in a cell is escaped.

    Cells are written with ``str``; format numbers with :func:`fmt` first.
    """
    header = list(header)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def md_dict_table(rows: Iterable[dict], cols: Sequence[tuple[str, str]], formatter=fmt) -> str:
    """:func:`md_table` of dict rows; ``cols`` is ``(key, heading)`` pairs and each cell is
    ``formatter(row.get(key))``."""
    return md_table([h for _, h in cols],
                    ([formatter(r.get(k)) for k, _ in cols] for r in rows))


def csv_cell(value, digits: int = 6):
    """``value`` as a CSV cell: a float (NumPy ``float64`` too) with ``digits`` significant
    digits, NaN and inf as ``""``; any other value unchanged (the csv module writes ``str``).

    >>> csv_cell(0.1234567), csv_cell(float("nan")), csv_cell(3), csv_cell(True)
    ('0.123457', '', 3, True)
    """
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else ""
    return value


def csv_rows(rows: Iterable[dict], digits: int = 6) -> tuple[list[dict], list[str]]:
    """Dict rows with every value through :func:`csv_cell`, and their columns: the keys of
    all rows in order of first appearance (for :func:`microbead_io.atomic_write_csv`)."""
    out = [{k: csv_cell(v, digits) for k, v in r.items()} for r in rows]
    columns: dict[str, None] = {}
    for r in out:
        columns.update(dict.fromkeys(r))
    return out, list(columns)
