"""metric-ds prepare: mask options, formats, determinism, validation before writing, atomic output."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import BANKING77, make_frame

from metric_ds.config import validate_config
from metric_ds.data.io import read_table
from metric_ds.data.pipeline import load_training_data
from metric_ds.data.prepare import prepare
from metric_ds.data.summary import format_summary, summarize
from metric_ds.data.validation import validate_frame
from metric_ds.errors import UserError

COUNTS = {"pin": 30, "card": 12, "atm": 5, "fee": 1}


@pytest.fixture
def source(tmp_path):
    labels = np.random.default_rng(0).permutation(np.repeat(list(COUNTS), list(COUNTS.values())))
    df = pd.DataFrame({"utterance": [f"  row {i}: my {y}\nplease " for i, y in enumerate(labels)], "intent": labels,
                       "other": 1})
    path = tmp_path / "in.csv"
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("fraction,per_class,metric,want_cls", [
    (None, None, "all", {"pin": 30, "card": 12, "atm": 5, "fee": 1}),
    (0.2, None, "all", {"pin": 6, "card": 2, "atm": 1, "fee": 1}),
    (0.5, None, "labelled", {"pin": 15, "card": 6, "atm": 2, "fee": 1}),  # 2.5 rounds to even
    (None, 4, "all", {"pin": 4, "card": 4, "atm": 4, "fee": 1}),
    (None, 4, "labelled", {"pin": 4, "card": 4, "atm": 4, "fee": 1}),
])
def test_mask_options(tmp_path, source, fraction, per_class, metric, want_cls):
    out = tmp_path / "out.parquet"
    s = prepare(source, out, "utterance", "intent", classifier_fraction=fraction, classifier_per_class=per_class,
                metric_mask=metric, seed=1)
    got = pd.read_parquet(out)
    assert list(got.columns) == ["text", "label", "metric_mask", "classifier_mask"]
    assert got[got["classifier_mask"] == 1]["label"].value_counts().to_dict() == want_cls
    if metric == "all":
        assert len(got) == 48 and (got["metric_mask"] == 1).all()
    else:  # metric rows are the labelled ones; the rest would be in neither loss and are left out
        assert (got["metric_mask"] == got["classifier_mask"]).all() and len(got) == sum(want_cls.values())
    assert s == {"rows": len(got), "classes": 4, "classifier_rows": sum(want_cls.values()),
                 "metric_rows": int(got["metric_mask"].sum())}


def test_deterministic_given_seed(tmp_path, source):
    runs = []
    for i, seed in enumerate([5, 5, 6]):
        prepare(source, tmp_path / f"{i}.parquet", "utterance", "intent", classifier_fraction=0.3, seed=seed)
        runs.append(pd.read_parquet(tmp_path / f"{i}.parquet"))
    pd.testing.assert_frame_equal(runs[0], runs[1])
    assert not runs[0]["classifier_mask"].equals(runs[2]["classifier_mask"])


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
@pytest.mark.parametrize("int_labels", [False, True])
def test_output_formats_round_trip_text_exactly(tmp_path, ext, int_labels):
    src = tmp_path / "in.jsonl"
    labels = [3, 1, 3, 2] if int_labels else ["c", "a", "c", "b"]
    df = pd.DataFrame({"text": ["  padded  ", "line\nbreak", 'quote " , comma', "ünï"], "label": labels})
    df.to_json(src, orient="records", lines=True, force_ascii=False)
    out = tmp_path / f"out.{ext}"
    prepare(src, out, classifier_per_class=1, seed=0)
    back = validate_frame(read_table(out), str(out))
    assert back["text"].tolist() == df["text"].tolist() and back["label"].tolist() == labels
    assert all(type(v) is type(labels[0]) for v in back["label"].tolist())
    assert back.groupby("label")["classifier_mask"].sum().tolist() == [1, 1, 1]


def test_option_errors_all_at_once_and_nothing_written(tmp_path, source):
    out = tmp_path / "out.xlsx"
    with pytest.raises(UserError) as info:
        prepare(source, out, "utterance", "intent", classifier_fraction=1.5, classifier_per_class=0, metric_mask="some")
    msgs = info.value.messages
    for needle in ("not both", "--classifier-fraction must be in (0, 1], got 1.5", "--classifier-per-class must be >= 1",
                   "--metric-mask must be one of all, labelled, got 'some'", "--output", "unknown table extension"):
        assert any(needle in m for m in msgs), needle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_missing_column_names_file_and_columns(tmp_path, source):
    with pytest.raises(UserError) as info:
        prepare(source, tmp_path / "o.parquet", "text", "intent")
    assert f"{source}: missing column(s) text (--text-column/--label-column); the table has utterance, intent, other" \
        in str(info.value)
    assert not (tmp_path / "o.parquet").exists()


def test_bad_rows_rejected_before_writing(tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"t": ["ok", "  ", "fine", ""], "y": ["a", "b", None, "a"]}).to_csv(src, index=False)
    out = tmp_path / "o.csv"
    out.write_text("previous content")
    with pytest.raises(UserError) as info:
        prepare(src, out, "t", "y")
    text = str(info.value)
    assert "whitespace-only text in rows 2, 4" in text and "null labels in row 3" in text
    assert out.read_text() == "previous content"


def test_atomic_write_leaves_old_output_on_failure(tmp_path, source, monkeypatch):
    out = tmp_path / "o.parquet"
    prepare(source, out, "utterance", "intent")
    before = out.read_bytes()

    def broken(self, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(UserError, match=rf"could not write {out}: .*disk full"):
        prepare(source, out, "utterance", "intent", classifier_per_class=2)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "o.parquet"]  # no temporary file left


@pytest.mark.skipif(not (BANKING77 / "train.csv").is_file(), reason="BANKING77 not beside the repository")
def test_banking77_prepare_then_validate(tmp_path):
    out = tmp_path / "b77.parquet"
    s = prepare(BANKING77 / "train.csv", out, "text", "category", classifier_per_class=10, seed=0)
    assert s == {"rows": 10003, "classes": 77, "classifier_rows": 770, "metric_rows": 10003}
    raw = read_table(BANKING77 / "train.csv")
    got = pd.read_parquet(out)
    assert got["text"].tolist() == raw["text"].tolist()  # nothing stripped or re-ordered
    cfg = validate_config({"data": {"train_path": str(out), "val_ratio": 0.1}, "training": {"batch_size": 32}})
    data = load_training_data(cfg)
    assert data.label_map.num_classes == 77 and abs(len(data.val) - 1000) < 40
    text = format_summary(summarize(data, cfg))
    assert "77 classes" in text and "batch size 32" in text


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
