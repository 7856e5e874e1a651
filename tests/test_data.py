"""The data pipeline: reading, every bad-input case, labels, split, balance, samplers, collation, prepare."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BANKING77, make_frame

from metric_ds.config import validate_config
from metric_ds.data.balance import balance_indices
from metric_ds.data.collate import Collator, TextDataset
from metric_ds.data.io import read_table
from metric_ds.data.labels import LabelMap
from metric_ds.data.pipeline import load_training_data
from metric_ds.data.prepare import prepare
from metric_ds.data.sampler import PKBatchSampler, RandomBatchSampler
from metric_ds.data.split import stratified_split
from metric_ds.data.summary import expected_anchor_pos_fraction
from metric_ds.data.validation import validate_frame
from metric_ds.errors import UserError


def cfg_for(path, **training):
    return validate_config({"data": {"train_path": str(path), "val_ratio": 0.25},
                            "training": {"batch_size": 8, **training}})


# ------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_round_trip_by_extension(tmp_path, ext):
    df = make_frame(20)
    path = tmp_path / f"t.{ext}"
    {"parquet": lambda: df.to_parquet(path), "csv": lambda: df.to_csv(path, index=False),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True)}[ext]()
    back = validate_frame(read_table(path), str(path))
    assert back["text"].tolist() == df["text"].tolist() and back["label"].tolist() == df["label"].tolist()


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.parquet: file not found"):
        read_table(tmp_path / "nope.parquet")


def test_file_not_what_its_extension_says(tmp_path):
    path = tmp_path / "table.parquet"
    path.write_text("text,label\nhello,1\n")
    with pytest.raises(UserError, match=r"table.parquet: could not be read as PARQUET"):
        read_table(path)


def test_unknown_extension(tmp_path):
    with pytest.raises(UserError, match="unknown table extension '.xlsx'"):
        read_table(tmp_path / "t.xlsx")


@pytest.mark.parametrize("content", ["", "text,label,metric_mask,classifier_mask\n"])
def test_empty_table(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(UserError, match="empty.csv: (the file is empty|the table has no rows)"):
        read_table(path)


# ------------------------------------------------------------------------------------ bad content


def test_missing_columns_lists_missing_and_present():
    df = pd.DataFrame({"text": ["a"], "category": ["x"]})
    with pytest.raises(UserError) as info:
        validate_frame(df, "f.csv")
    msg = str(info.value)
    assert "missing column(s) label, metric_mask, classifier_mask" in msg and "the table has text, category" in msg


def test_bad_text_rows_named():
    df = make_frame(8)
    df.loc[[1, 4, 6], "text"] = [None, "", "   \n"]
    with pytest.raises(UserError, match=r"column text: null, empty or whitespace-only text in rows 2, 5, 7"):
        validate_frame(df, "f.csv")


def test_null_labels_and_mixed_types():
    df = make_frame(6)
    df["label"] = pd.Series(["a", 3, None, "b", 4, "c"], dtype=object)
    with pytest.raises(UserError) as info:
        validate_frame(df, "f.parquet")
    msgs = info.value.messages
    assert any("null labels in row 3" in m for m in msgs)
    assert any("labels of mixed types (str in rows 1, 4, 6; int in rows 2, 5)" in m for m in msgs)


def test_bad_and_null_masks():
    df = make_frame(5)
    df["metric_mask"] = pd.Series([1, 2, 0, "yes", 1], dtype=object)
    df["classifier_mask"] = pd.Series([1, None, 1, 1, 0], dtype=object)
    with pytest.raises(UserError) as info:
        validate_frame(df, "f.csv")
    text = str(info.value)
    assert "column metric_mask: values outside {0, 1, True, False} (2, 'yes') in rows 2, 4" in text
    assert "column classifier_mask: null values in row 2" in text


def test_bool_masks_accepted_and_both_zero_dropped(caplog):
    df = make_frame(6)
    df["metric_mask"] = [True, False, True, False, True, False]
    df["classifier_mask"] = [True, False, False, False, True, True]
    with caplog.at_level(logging.WARNING, logger="metric_ds"):
        out = validate_frame(df, "f.csv")
    assert len(out) == 4
    assert "dropped 2 row(s) with both metric_mask and classifier_mask 0" in caplog.text


def test_loss_weight_without_rows(tmp_path):
    df = make_frame(40)
    df["classifier_mask"] = 0
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    with pytest.raises(UserError, match="training.classification_loss_weight is 1.0 but no training row has "
                                        "classifier_mask = 1"):
        load_training_data(cfg_for(path))
    df["classifier_mask"], df["metric_mask"] = 1, 0
    df.to_parquet(path)
    with pytest.raises(UserError, match="training.metric_loss_weight is 1.0 but no training row has metric_mask"):
        load_training_data(cfg_for(path))
    assert load_training_data(cfg_for(path, metric_loss_weight=0)).train["metric_mask"].sum() == 0


def test_dataset_smaller_than_one_batch(tmp_path):
    path = tmp_path / "t.parquet"
    make_frame(12).to_parquet(path)
    with pytest.raises(UserError, match=r"fewer than one batch \(training.batch_size = 32\)"):
        load_training_data(cfg_for(path, batch_size=32))


def test_validation_file_with_unseen_labels(tmp_path):
    train, val = tmp_path / "train.parquet", tmp_path / "val.csv"
    make_frame(40, num_classes=3).to_parquet(train)
    v = make_frame(10, num_classes=3)
    v.loc[[0, 1], "label"] = ["class_9", "class_7"]
    v.to_csv(val, index=False)
    cfg = validate_config({"data": {"train_path": str(train), "val_path": str(val)},
                           "training": {"batch_size": 8}})
    with pytest.raises(UserError, match="val.csv: validation labels not in the training data .*: class_7, class_9"):
        load_training_data(cfg)


def test_dataframe_api(tmp_path):
    cfg = cfg_for("unused.parquet")
    data = load_training_data(cfg, frame=make_frame(40))
    assert len(data.train) + len(data.val) == 40


# --------------------------------------------------------------------- labels, split, balance


def test_label_map_stable_order_and_round_trip(tmp_path):
    lm = LabelMap.from_labels([10, 2, 33, 2])
    assert lm.names == [2, 10, 33] and lm.encode([33, 2]).tolist() == [2, 0]
    lm.save(tmp_path / "labels.json")
    assert LabelMap.load(tmp_path / "labels.json").names == [2, 10, 33]
    assert json.loads((tmp_path / "labels.json").read_text())["type"] == "int"
    assert LabelMap.from_labels(["b", "a"]).names == ["a", "b"]


def test_stratified_split_deterministic_and_small_classes(caplog):
    labels = np.array([0] * 50 + [1] * 30 + [2] * 1 + [3] * 2)
    with caplog.at_level(logging.WARNING, logger="metric_ds"):
        tr, va = stratified_split(labels, 0.2, seed=5)
    tr2, va2 = stratified_split(labels, 0.2, seed=5)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert np.bincount(labels[va], minlength=4).tolist() == [10, 6, 0, 0]
    assert "2 class(es) too small to split" in caplog.text
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(labels)


def test_balance_up_and_down():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 6)
    idx = balance_indices(labels, upsample=5, downsample=8, seed=1)
    assert np.bincount(labels[idx]).tolist() == [8, 5, 6]
    assert np.array_equal(idx, balance_indices(labels, upsample=5, downsample=8, seed=1))
    assert len(set(idx[labels[idx] == 0])) == 8  # downsampling is without replacement


# --------------------------------------------------------------------------------------- samplers


def test_random_sampler_shards_cover_the_data_once():
    batches = []
    for rank in range(3):
        s = RandomBatchSampler(50, 4, seed=2, rank=rank, world_size=3)
        s.set_epoch(1)
        got = list(s)
        assert len(got) == len(s) == math.ceil(math.ceil(50 / 3) / 4)
        batches += got
    seen = [i for b in batches for i in b]
    assert set(seen) == set(range(50)) and len(seen) == 51  # one row repeated to even the shards
    a = RandomBatchSampler(50, 4, seed=2)
    a.set_epoch(0)
    b = RandomBatchSampler(50, 4, seed=2)
    b.set_epoch(1)
    assert list(a) != list(b) and list(a) == list(RandomBatchSampler(50, 4, seed=2))


def test_two_ranks_form_the_single_process_global_batch():
    one = list(RandomBatchSampler(40, 8, seed=0))
    r0 = list(RandomBatchSampler(40, 4, seed=0, rank=0, world_size=2))
    r1 = list(RandomBatchSampler(40, 4, seed=0, rank=1, world_size=2))
    for k in range(5):
        assert sorted(r0[k] + r1[k]) == sorted(one[k])


def test_pk_sampler_composition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    metric = (rng.random(300) < 0.8).astype(int)
    s = PKBatchSampler(labels, metric, classes_per_batch=4, samples_per_class=3, batch_size=16, seed=1)
    batches = list(s)
    seen = [i for b in batches for i in b]
    assert sorted(seen) == list(range(300))  # every row once per epoch
    for b in batches:
        m = [i for i in b if metric[i]]
        counts = np.bincount(labels[m], minlength=10)
        assert (counts != 1).all()  # every metric row in the batch has a positive
    assert list(PKBatchSampler(labels, metric, 4, 3, 16, seed=1)) == batches
    shards = [list(PKBatchSampler(labels, metric, 4, 3, 16, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])


# ------------------------------------------------------------------------------------------ collate


def test_dynamic_padding(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    df = pd.DataFrame({"text": ["hi", "a much longer text with many words in it", "mid size text"],
                       "label_id": [0, 1, 0], "metric_mask": [1, 0, 1], "classifier_mask": [1, 1, 0]})
    ds = TextDataset.from_frame(df, tok, max_seq_length=6)
    batch = Collator(tok)([ds[0], ds[2]])
    assert batch["input_ids"].shape[1] == max(len(ds[0]["input_ids"]), len(ds[2]["input_ids"])) <= 6
    assert batch["attention_mask"].sum(1).tolist() == [len(ds[0]["input_ids"]), len(ds[2]["input_ids"])]
    assert batch["metric_mask"].dtype == torch.bool and batch["index"].tolist() == [0, 2]
    assert Collator(tok)([ds[1]])["input_ids"].shape[1] == 6  # truncated


# ------------------------------------------------------------------------------------------ prepare


def test_prepare_masks_and_determinism(tmp_path):
    src = tmp_path / "in.csv"
    df = make_frame(90, num_classes=3).rename(columns={"text": "utterance", "label": "intent"})
    df[["utterance", "intent"]].to_csv(src, index=False)
    out = tmp_path / "out.parquet"
    s = prepare(src, out, "utterance", "intent", classifier_per_class=5, metric_mask="all", seed=3)
    got = pd.read_parquet(out)
    assert s == {"rows": 90, "classes": 3, "classifier_rows": 15, "metric_rows": 90}
    assert got.groupby("label")["classifier_mask"].sum().tolist() == [5, 5, 5]
    prepare(src, tmp_path / "again.parquet", "utterance", "intent", classifier_per_class=5, seed=3)
    assert pd.read_parquet(tmp_path / "again.parquet").equals(got)
    prepare(src, tmp_path / "lab.jsonl", "utterance", "intent", classifier_fraction=0.2, metric_mask="labelled")
    lab = pd.read_json(tmp_path / "lab.jsonl", lines=True)
    assert (lab["metric_mask"] == 1).all() and len(lab) == 18


def test_prepare_validates_before_writing(tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": ["ok", " "], "y": [1, 2]}).to_csv(src, index=False)
    out = tmp_path / "out.parquet"
    with pytest.raises(UserError, match="missing column.*label.*the table has text, y"):
        prepare(src, out, "text", "label")
    with pytest.raises(UserError, match="whitespace-only text in row 2"):
        prepare(src, out, "text", "y")
    assert not out.exists()


@pytest.mark.skipif(not (BANKING77 / "train.csv").is_file(), reason="BANKING77 not beside the repository")
def test_prepare_reads_banking77_quirks(tmp_path):
    out = tmp_path / "b77.parquet"
    s = prepare(BANKING77 / "train.csv", out, "text", "category")
    assert s["rows"] == 10003 and s["classes"] == 77
    df = pd.read_parquet(out)
    assert df["text"].str.contains("\n").sum() >= 10  # quoted newlines kept inside their field
    assert not df["text"].str.endswith("\r").any()


# ------------------------------------------------------------------------------------------ summary


def test_expected_anchor_fraction_matches_simulation():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 400)
    metric = (rng.random(400) < 0.7).astype(int)
    want = expected_anchor_pos_fraction(labels, metric, 400, 16)
    hits = total = 0
    for _ in range(3000):
        b = rng.choice(400, 16, replace=False)
        m = b[metric[b] == 1]
        counts = np.bincount(labels[m], minlength=12)
        hits += (counts[labels[m]] > 1).sum()
        total += len(m)
    assert want == pytest.approx(hits / total, abs=0.01)
