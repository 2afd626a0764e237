"""The one number format and markdown table every report uses (reporting.py)."""

import math

import numpy as np
import pytest

import reporting


def test_fmt_significant_fixed_missing_and_whole_numbers():
    assert reporting.fmt(0.123456) == "0.123"
    assert reporting.fmt(0.123456, 4) == "0.1235"
    assert reporting.fmt(0.5, 2, style="fixed") == "0.50"
    assert reporting.fmt(12345.6, 3, big=1e4) == "12346"
    assert reporting.fmt(12345.6, 3) == "1.23e+04"
    for missing in (None, "", math.nan, math.inf, np.float32("nan")):
        assert reporting.fmt(missing) == "n/a"
    assert reporting.fmt(np.bool_(False)) == "no"
    assert reporting.fmt(np.int64(42)) == "42"
    assert reporting.fmt("text") == "text"
    with pytest.raises(ValueError, match="style"):
        reporting.fmt(1.0, style="percent")


def test_md_table_escapes_pipes_and_dict_rows_use_the_formatter():
    assert reporting.md_table(["a", "b"], [[1, "x|y"]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1 | x\\|y |"]
    text = reporting.md_dict_table([{"n": 3, "p": 0.25}, {"n": 4}], [("n", "N"), ("p", "P")])
    assert text.splitlines()[2:] == ["| 3 | 0.25 |", "| 4 | n/a |"]
