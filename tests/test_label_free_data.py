"""Label-free rows in the data: a null label with metric_mask 1 and classifier_mask 0 is valid training input; it
has no class, label_id LABEL_FREE, stays out of validation, balancing and the pk groups, and the summary counts it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_frame, make_label_free_frame

from metric_ds.data.balance import balance_indices
from metric_ds.data.labels import LABEL_FREE
from metric_ds.data.pipeline import build_training_data
from metric_ds.data.sampler import PKBatchSampler
from metric_ds.data.summary import format_summary, summarize_frame
from metric_ds.data.validation import validate_frame
from metric_ds.errors import UserError


def test_a_label_free_row_is_valid_training_input_and_nowhere_else():
    df = make_label_free_frame(12)
    out = validate_frame(df, "t", allow_label_free=True)
    assert out["label"].isna().tolist() == (df.index % 3 == 1).tolist()
    with pytest.raises(UserError, match="null labels in rows 2, 5, 8, 11; every row needs a label"):
        validate_frame(df, "t")  # evaluate, prepare: every row needs a label


@pytest.mark.parametrize("metric,classifier", [(1, 1), (0, 1)])
def test_a_null_label_with_other_masks_is_an_error_naming_rows_and_fix(metric, classifier):
    df = make_label_free_frame(12)
    df.loc[4, ["metric_mask", "classifier_mask"]] = [metric, classifier]
    df.loc[4, "label"] = None
    with pytest.raises(UserError) as err:
        validate_frame(df, "t.csv", allow_label_free=True)
    (msg,) = err.value.messages
    assert msg.startswith("t.csv: column label: null labels in row 5, which have classifier_mask = 1 or metric_mask")
    assert "set their metric_mask to 1 and classifier_mask to 0" in msg


def test_a_null_label_with_both_masks_zero_is_an_error_too():
    df = make_label_free_frame(6)
    df.loc[1, "metric_mask"] = 0
    with pytest.raises(UserError, match="null labels in row 2, which"):
        validate_frame(df, "t", allow_label_free=True)


def test_every_label_null_is_an_error():
    df = make_label_free_frame(6)
    df["label"], df["classifier_mask"] = None, 0
    with pytest.raises(UserError, match="every label is null"):
        validate_frame(df, "t", allow_label_free=True)


@pytest.mark.parametrize("ints", [False, True])
def test_labels_keep_their_type_beside_nulls(ints):
    df = make_label_free_frame(9)
    if ints:
        df["label"] = pd.Series([7, None, 3, 7, None, 3, 3, None, 7], dtype=object)
    out = validate_frame(df, "t", allow_label_free=True)
    known = out["label"].dropna().tolist()
    assert all(isinstance(v, int if ints else str) for v in known)
    assert str(out["label"].dtype) == ("Int64" if ints else "object")


def test_the_pipeline_gives_label_free_rows_no_class_and_keeps_them_out_of_validation():
    df = make_label_free_frame(120)
    data = build_training_data(df, val_ratio=0.2, batch_size=8)
    assert data.label_map.names == ["class_0", "class_1", "class_2", "class_3"]
    free = data.train["label"].isna()
    assert free.sum() == 40 and (data.train.loc[free, "label_id"] == LABEL_FREE).all()
    assert (data.train.loc[~free, "label_id"] >= 0).all()
    assert not data.val["label"].isna().any() and len(data.val) > 0
    # the labelled rows split as they would without the label-free rows
    alone = build_training_data(df[df["label"].notna()].reset_index(drop=True), val_ratio=0.2, batch_size=8)
    pd.testing.assert_frame_equal(data.val, alone.val)
    pd.testing.assert_frame_equal(data.train[~free].reset_index(drop=True), alone.train)


def test_an_explicit_validation_table_drops_its_label_free_rows_with_a_warning():
    data = build_training_data(make_label_free_frame(60), val_frame=make_label_free_frame(30, seed=1), batch_size=8)
    assert len(data.val) == 20 and not data.val["label"].isna().any()
    assert any("dropped 10 label-free row(s)" in w for w in data.warnings)


def test_balancing_leaves_label_free_rows_as_they_are():
    labels = np.array([0, 0, 0, 0, 1, LABEL_FREE, LABEL_FREE, 1, LABEL_FREE])
    keep = balance_indices(labels, upsample=3, downsample=3, seed=0)
    assert sorted(keep[labels[keep] == LABEL_FREE].tolist()) == [5, 6, 8]
    assert (np.bincount(labels[keep][labels[keep] >= 0]) == 3).all()
    plain = labels[labels >= 0]
    np.testing.assert_array_equal(labels[keep][labels[keep] >= 0], plain[balance_indices(plain, 3, 3, 0)])


def test_pk_batches_take_label_free_rows_as_fill():
    labels = np.array([0, 0, 1, 1, LABEL_FREE, LABEL_FREE, LABEL_FREE, LABEL_FREE])
    sampler = PKBatchSampler(labels, np.ones(8), classes_per_batch=2, samples_per_class=2, batch_size=6)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(sorted(labels[b][labels[b] >= 0].tolist()) == [0, 0, 1, 1] for b in batches if len(b) == 6)


def test_the_summary_counts_label_free_rows():
    data = build_training_data(make_label_free_frame(120), val_ratio=0.2, batch_size=8)
    s = summarize_frame(data.train, data.label_map, batch_size=8)
    assert s["label_free_rows"] == 40 and s["metric_rows"] == len(data.train)
    assert s["rows_per_class_max"] < 40
    assert "label-free 40" in format_summary(s)
    plain = summarize_frame(build_training_data(make_frame(80), val_ratio=0.2, batch_size=8).train,
                            data.label_map, batch_size=8)
    assert plain["label_free_rows"] == 0 and "label-free" not in format_summary(plain)
