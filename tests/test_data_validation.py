"""Validating a table: every bad-input case names the file, the column and the rows; all are reported at once."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from conftest import make_frame

from metric_ds.data.validation import validate_frame
from metric_ds.errors import UserError


def _problems(df: pd.DataFrame, source: str = "data/t.parquet") -> list[str]:
    with pytest.raises(UserError) as info:
        validate_frame(df, source)
    return info.value.messages


def test_missing_columns_named_with_the_present_ones_and_other_problems_too():
    df = pd.DataFrame({"text": ["ok", " "], "label": ["a", "b"], "category": ["x", "y"]})
    msgs = _problems(df)
    assert any("data/t.parquet: missing column(s) metric_mask, classifier_mask; the table has text, label, category"
               in m for m in msgs)
    assert any("column text" in m and "row 2" in m for m in msgs)  # gathered, not stopped at the first


@pytest.mark.parametrize("bad,rows", [
    ({1: None}, "row 2"), ({0: ""}, "row 1"), ({2: " \t\n"}, "row 3"), ({1: np.nan, 5: "", 7: "  "}, "rows 2, 6, 8"),
])
def test_null_empty_whitespace_text(bad, rows):
    df = make_frame(8)
    df["text"] = df["text"].astype(object)
    for i, v in bad.items():
        df.loc[i, "text"] = v
    msgs = _problems(df)
    assert msgs == [f"data/t.parquet: column text: null, empty or whitespace-only text in {rows}; "
                    "remove those rows or fill in the text"]


def test_text_that_is_not_a_string():
    df = make_frame(4)
    df["text"] = pd.Series(["a", 5, "c", 7.5], dtype=object)
    msgs = _problems(df)
    assert any("column text: values that are not text (int) in row 2" in m for m in msgs)
    assert any("column text: values that are not text (float) in row 4" in m for m in msgs)


def test_many_bad_rows_are_summarised():
    df = make_frame(20)
    df["text"] = ""
    (msg,) = _problems(df)
    assert "rows 1, 2, 3, 4, 5 and 15 more" in msg


def test_null_labels():
    df = make_frame(6)
    df["label"] = pd.Series(["a", None, "b", np.nan, "a", "b"], dtype=object)
    assert _problems(df) == ["data/t.parquet: column label: null labels in rows 2, 4; every row needs a label"]


def test_mixed_type_labels_say_which_rows_are_which():
    df = make_frame(5)
    df["label"] = pd.Series([1, "b", 2.0, "c", np.int64(3)], dtype=object)
    (msg,) = _problems(df)
    assert "column label: labels of mixed types (int in rows 1, 3, 5; str in rows 2, 4)" in msg


@pytest.mark.parametrize("values,kind", [([0.5, 1.5, 2.5], "float"), ([True, False, True], "bool")])
def test_labels_must_be_strings_or_integers(values, kind):
    df = make_frame(3)
    df["label"] = pd.Series(values, dtype=object)
    (msg,) = _problems(df)
    assert f"labels must be strings or integers, found {kind} in rows 1, 2, 3" in msg


def test_integer_valued_float_labels_become_ints():
    df = make_frame(3)
    df["label"] = [3.0, 1.0, 3.0]
    out = validate_frame(df, "t")
    assert out["label"].tolist() == [3, 1, 3] and out["label"].dtype == np.int64


@pytest.mark.parametrize("col", ["metric_mask", "classifier_mask"])
@pytest.mark.parametrize("values,shown,rows", [
    ([1, 2, 0, 1], "2", "row 2"),
    (["1", "yes", 0, -1], "'yes', -1", "rows 2, 4"),
    ([0.5, 1, 1, 1], "0.5", "row 1"),
])
def test_mask_values_outside_0_1(col, values, shown, rows):
    df = make_frame(4)
    df[col] = pd.Series(values, dtype=object)
    (msg,) = _problems(df)
    assert msg.startswith(f"data/t.parquet: column {col}: values outside {{0, 1, True, False}} ({shown}) in {rows}")


def test_integer_mask_column_with_bad_values_fast_path():
    df = make_frame(6)
    df["metric_mask"] = np.array([1, 0, 3, 1, -1, 1], dtype=np.int64)
    (msg,) = _problems(df)
    assert "column metric_mask: values outside {0, 1, True, False} (3, -1) in rows 3, 5" in msg


@pytest.mark.parametrize("col", ["metric_mask", "classifier_mask"])
def test_null_masks(col):
    df = make_frame(5)
    df[col] = [1.0, np.nan, 1.0, None, 0.0]
    (msg,) = _problems(df)
    assert msg == f"data/t.parquet: column {col}: null values in rows 2, 4; use 0 or 1"


def test_every_problem_in_one_error():
    df = make_frame(6)
    df.loc[0, "text"] = " "
    df["label"] = pd.Series(["a", None, "b", 1, "a", "b"], dtype=object)
    df["metric_mask"] = pd.Series([1, 1, 5, 1, 1, 1], dtype=object)
    df["classifier_mask"] = [1, 1, 1, np.nan, 1, 1]
    msgs = _problems(df)
    assert len(msgs) == 5
    for needle in ("column text", "null labels in row 2", "mixed types", "column metric_mask", "column classifier_mask"):
        assert any(needle in m for m in msgs), needle


@pytest.mark.parametrize("metric,classifier", [
    ([True, False, 1, 0], [True, False, 0, 1]),
    (["1", "false", "True", "0"], ["true", "0", " 0 ", "1"]),
    ([1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]),
])
def test_accepted_mask_spellings_and_both_zero_rows_dropped(caplog, metric, classifier):
    df = make_frame(4)
    df["metric_mask"] = pd.Series(metric, dtype=object)
    df["classifier_mask"] = pd.Series(classifier, dtype=object)
    collected: list[str] = []
    with caplog.at_level(logging.WARNING, logger="metric_ds"):
        out = validate_frame(df, "f.csv", warnings_out=collected)
    assert out["metric_mask"].tolist() == [1, 1, 0] and out["classifier_mask"].tolist() == [1, 0, 1]
    assert out["metric_mask"].dtype == np.int8 and out["classifier_mask"].dtype == np.int8
    assert out["text"].tolist() == df["text"].iloc[[0, 2, 3]].tolist() and list(out.index) == [0, 1, 2]
    assert len(collected) == 1 and "f.csv: dropped 1 row(s) with both metric_mask and classifier_mask 0" in collected[0]
    assert collected[0] in caplog.text


def test_all_rows_with_both_masks_zero():
    df = make_frame(3)
    df["metric_mask"] = df["classifier_mask"] = 0
    assert "t.csv: no row has metric_mask or classifier_mask set" in _problems(df, "t.csv")[0]


def test_extra_columns_ignored_and_input_untouched():
    df = make_frame(4)
    df["notes"] = ["x", None, 3, "y"]
    before = df.copy()
    out = validate_frame(df, "t")
    assert list(out.columns) == ["text", "label", "metric_mask", "classifier_mask"]
    pd.testing.assert_frame_equal(df, before)


def test_empty_frame():
    assert _problems(make_frame(3).iloc[:0], "t.csv") == ["t.csv: the table has no rows"]
