"""load_training_data: cross-checks against the config, all gathered into one error with full key paths."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_frame

from metric_ds.config import validate_config
from metric_ds.data.pipeline import build_training_data, load_training_data
from metric_ds.errors import UserError


def _cfg(path, data=None, **training):
    return validate_config({"data": {"train_path": str(path), "val_ratio": 0.25, **(data or {})},
                            "training": {"batch_size": 8, **training}})


def _write(df: pd.DataFrame, path):
    suffix = str(path).rsplit(".", 1)[-1]
    if suffix == "parquet":
        df.to_parquet(path)
    elif suffix == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_csv(path, index=False)
    return path


def test_splits_encoded_deterministic_and_nothing_written(tmp_path):
    path = _write(make_frame(80, num_classes=4), tmp_path / "t.parquet")
    before = sorted(p.name for p in tmp_path.iterdir())
    a, b = load_training_data(_cfg(path)), load_training_data(_cfg(path))
    pd.testing.assert_frame_equal(a.train, b.train)
    pd.testing.assert_frame_equal(a.val, b.val)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert len(a.train) + len(a.val) == 80 and a.label_map.names == ["class_0", "class_1", "class_2", "class_3"]
    for df in (a.train, a.val):
        assert (np.array(a.label_map.decode(df["label_id"])) == df["label"].to_numpy()).all()
    c = load_training_data(_cfg(path, seed=1))
    assert not a.val["text"].equals(c.val["text"])


def test_every_cross_check_in_one_error(tmp_path):
    df = make_frame(12)
    df["classifier_mask"] = 0
    path = _write(df, tmp_path / "t.parquet")
    with pytest.raises(UserError) as info:
        load_training_data(_cfg(path, batch_size=32))
    msgs = info.value.messages
    assert len(msgs) == 2
    assert f"{path}: training.classification_loss_weight is 1.0 but no training row has classifier_mask = 1" in msgs[0]
    assert "fewer than one batch (training.batch_size = 32)" in msgs[1]


def test_metric_weight_without_metric_rows_and_zero_weight_is_fine(tmp_path):
    df = make_frame(40)
    df["metric_mask"] = 0
    path = _write(df, tmp_path / "t.csv")
    with pytest.raises(UserError, match="training.metric_loss_weight is 1.0 but no training row has metric_mask = 1"):
        load_training_data(_cfg(path))
    data = load_training_data(_cfg(path, metric_loss_weight=0.0))
    assert len(data.train) + len(data.val) == 40 and data.train["metric_mask"].sum() == 0


def test_split_is_stratified_by_masks_too():
    """The split stratifies on (label, classifier_mask, metric_mask): a lone labelled row stays in train, and
    a labelled subset is split in proportion (the limited-labelling use case: 10 per class -> 9 train, 1 val)."""
    df = make_frame(40, num_classes=2)
    df["classifier_mask"] = 0
    df.loc[0, "classifier_mask"] = 1
    for seed in range(6):
        data = build_training_data(df, val_ratio=0.5, seed=seed)
        assert data.train["classifier_mask"].sum() == 1
    big = make_frame(400, num_classes=4)
    big["classifier_mask"] = 0
    for label in big["label"].unique():
        big.loc[big.index[big["label"] == label][:10], "classifier_mask"] = 1
    data = build_training_data(big, val_ratio=0.1, seed=42)
    assert data.train.groupby("label")["classifier_mask"].sum().tolist() == [9, 9, 9, 9]
    assert data.val.groupby("label")["classifier_mask"].sum().tolist() == [1, 1, 1, 1]


def test_file_problems_from_train_and_validation_files_together(tmp_path):
    train = make_frame(20)
    train.loc[2, "text"] = " "
    val = make_frame(10).drop(columns="metric_mask")
    tp, vp = _write(train, tmp_path / "train.parquet"), _write(val, tmp_path / "val.csv")
    cfg = _cfg(tp, data={"val_path": str(vp)})
    with pytest.raises(UserError) as info:
        load_training_data(cfg)
    msgs = info.value.messages
    assert any(m.startswith(f"{tp}: column text") and "row 3" in m for m in msgs)
    assert any(m.startswith(f"{vp}: missing column(s) metric_mask") for m in msgs)


def test_missing_validation_file(tmp_path):
    tp = _write(make_frame(20), tmp_path / "train.parquet")
    with pytest.raises(UserError, match="nope.csv: file not found"):
        load_training_data(_cfg(tp, data={"val_path": str(tmp_path / "nope.csv")}))


def test_validation_file_with_unseen_labels_and_a_type_hint(tmp_path):
    train = make_frame(30, num_classes=3)
    train["label"] = train["label"].str.removeprefix("class_").astype(int)
    val = make_frame(6, num_classes=3)
    val["label"] = ["0", "1", "2", "0", "1", "7"]
    tp, vp = _write(train, tmp_path / "train.parquet"), _write(val, tmp_path / "val.jsonl")
    with pytest.raises(UserError) as info:
        load_training_data(_cfg(tp, data={"val_path": str(vp)}))
    (msg,) = info.value.messages
    assert msg.startswith(f"{vp}: validation labels not in the training data ({tp}): 0, 1, 2, 7")
    assert "the known labels are ints" in msg


def test_validation_file_used_as_is_and_balance_only_on_train(tmp_path):
    train = make_frame(60, num_classes=3, seed=1)
    val = make_frame(9, num_classes=3, seed=2)
    tp, vp = _write(train, tmp_path / "train.csv"), _write(val, tmp_path / "val.parquet")
    data = load_training_data(_cfg(tp, data={"val_path": str(vp), "upsample": 25, "downsample": 25}))
    assert data.train["label_id"].value_counts().tolist() == [25, 25, 25]
    assert data.val["text"].tolist() == val["text"].tolist()


def test_dataframe_api_and_warnings_collected():
    df = make_frame(40, num_classes=3)
    df = pd.concat([df, pd.DataFrame({"text": ["lonely"], "label": ["rare"], "metric_mask": [1],
                                      "classifier_mask": [1]})], ignore_index=True)
    df.loc[5, ["metric_mask", "classifier_mask"]] = 0
    data = load_training_data(_cfg("unused.parquet"), frame=df)
    assert len(data.train) + len(data.val) == 40
    assert any("dropped 1 row(s)" in w for w in data.warnings)
    assert any("1 (label, masks) group(s) too small to split" in w for w in data.warnings)


def test_validation_split_empty(tmp_path):
    df = make_frame(8, num_classes=8)  # at most a couple of rows per class: nothing to split at 0.1
    with pytest.raises(UserError, match="the validation split is empty .* raise data.val_ratio or give "
                                        "data.val_path"):
        load_training_data(_cfg("x.parquet", data={"val_ratio": 0.1}, batch_size=1), frame=df)


def test_pk_settings_checked_against_the_batch(tmp_path):
    cfg = _cfg("x.parquet", data={"sampler": "pk", "classes_per_batch": 4, "samples_per_class": 4}, batch_size=8)
    with pytest.raises(UserError, match=r"data.classes_per_batch x data.samples_per_class = 4 x 4 = 16 exceeds "
                                        r"training.batch_size = 8"):
        load_training_data(cfg, frame=make_frame(80))
    cfg = _cfg("x.parquet", data={"sampler": "pk", "classes_per_batch": 8, "samples_per_class": 2}, batch_size=16)
    data = load_training_data(cfg, frame=make_frame(80, num_classes=4))
    assert any("only 4 class(es) have >= 2 metric rows" in w for w in data.warnings)


def test_loss_weight_without_rows(tmp_path):
    df = make_frame(40)
    df["classifier_mask"] = 0
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    with pytest.raises(UserError, match="training.classification_loss_weight is 1.0 but no training row has "
                                        "classifier_mask = 1"):
        load_training_data(_cfg(path))
    df["classifier_mask"], df["metric_mask"] = 1, 0
    df.to_parquet(path)
    with pytest.raises(UserError, match="training.metric_loss_weight is 1.0 but no training row has metric_mask"):
        load_training_data(_cfg(path))
    assert load_training_data(_cfg(path, metric_loss_weight=0)).train["metric_mask"].sum() == 0


def test_dataset_smaller_than_one_batch(tmp_path):
    path = tmp_path / "t.parquet"
    make_frame(12).to_parquet(path)
    with pytest.raises(UserError, match=r"fewer than one batch \(training.batch_size = 32\)"):
        load_training_data(_cfg(path, batch_size=32))
