"""reporting.csv_cell / csv_rows: the one way report CSVs write their cells."""

import math

import numpy as np

import microbead_io as mio
import reporting


def test_csv_cell_floats_six_significant_digits_non_finite_empty_others_unchanged():
    assert reporting.csv_cell(0.1234567) == "0.123457"
    assert reporting.csv_cell(np.float64(2.5e-7)) == "2.5e-07"
    assert reporting.csv_cell(1234567.0) == "1.23457e+06"
    for v in (math.nan, math.inf, np.float64("-inf")):
        assert reporting.csv_cell(v) == ""
    for v in (3, True, "", "x", None, np.int64(4)):
        assert reporting.csv_cell(v) is v


def test_csv_rows_columns_in_first_seen_order_and_bytes(tmp_path):
    rows, cols = reporting.csv_rows([{"a": 1.0, "b": math.nan}, {"c": "x", "a": 2}])
    assert cols == ["a", "b", "c"]
    assert rows == [{"a": "1", "b": ""}, {"c": "x", "a": 2}]
    mio.atomic_write_csv(tmp_path / "t.csv", rows, cols)
    assert (tmp_path / "t.csv").read_bytes() == b"a,b,c\r\n1,,\r\n2,,x\r\n"
