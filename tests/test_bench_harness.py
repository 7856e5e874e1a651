"""benchmarks/harness.py: the generic ``size`` column, the Markdown pivot, and the results CSVs' shape."""
from __future__ import annotations

import csv
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # noqa: E402


def test_size_round_trips_named_dimensions_in_order():
    assert harness.size(B=4096, d=384) == "B=4096 d=384"
    assert harness.dims({"size": "N=1000000 d=384"}) == {"N": 1000000, "d": 384}
    assert harness.dims({"size": ""}) == {} and harness.dims({}) == {}


def test_markdown_table_has_one_column_per_dimension_and_provider():
    row = {"mode": "full", "metric": "time", "dtype": "fp32", "status": "ok"}
    rows = [{**row, "provider": "fused", "size": harness.size(B=8192, d=384), "p50": 0.5},
            {**row, "provider": "fused", "size": harness.size(B=1024, d=384), "p50": 0.25},
            {**row, "provider": "reference", "size": harness.size(B=1024, d=384), "p50": 1.0, "status": "OOM"}]
    lines = harness.markdown_table(rows, "time", "s").splitlines()
    assert lines[2] == "| mode | B | d | dtype | fused | reference |"
    assert lines[4:] == ["| full | 1024 | 384 | fp32 | 0.25 | OOM |", "| full | 8192 | 384 | fp32 | 0.5 |  |"]


def test_every_results_csv_has_the_harness_columns():
    for path in sorted((REPO / "benchmarks" / "results").glob("*.csv")):
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == harness.FIELDS, path.name
        assert all(harness.dims(r) for r in rows), f"{path.name}: a row without a size"
