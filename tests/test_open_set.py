"""Open set: the three in-scope scores against plain PyTorch, thresholds chosen on known-class validation rows only
(at the end of training and by ``metric-ds calibrate``), ``predict --reject``, ``evaluate --unknown-label``, the
new classes through the k-NN bank. The ONNX route (numpy over the export) is tests/test_export.py's
``test_readme_onnx_reject_block``."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_frame

import metric_ds
from metric_ds.cli import main as cli
from metric_ds.errors import UserError
from metric_ds.open_set import (
    OPEN_SET_FILE,
    Reference,
    open_set_metrics,
    scores,
    threshold_for,
)


def by_hand_threshold(values: np.ndarray, rate: float) -> float:
    """The threshold a reader of the docs would compute: sort, and take the value at floor(rate * n)."""
    return float(np.sort(values)[math.floor(rate * len(values))])


@pytest.fixture(scope="module")
def calibrated(tiny_run, tmp_path_factory):
    """A copy of the tiny run's best/ (calibrated at the end of training), and its validation-free train table."""
    folder = tmp_path_factory.mktemp("open_set") / "best"
    shutil.copytree(tiny_run / "best", folder)
    return folder


# ------------------------------------------------------------------------------------------------ the scores


def test_scores_match_plain_pytorch():
    torch.manual_seed(0)
    logits = torch.randn(7, 3)
    z = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    ref_z = torch.nn.functional.normalize(torch.randn(20, 5), dim=1)
    ref_ids = torch.arange(20) % 3
    ref = Reference.build(ref_z, ref_ids, 3)
    got = scores(logits, z, ref, knn_k=4)
    assert torch.allclose(got["msp"], torch.softmax(logits, 1).max(1).values)
    sims = z @ ref.z.T  # the stored (fp16-rounded) reference rows
    assert torch.allclose(got["knn"], sims.topk(4, dim=1).values.mean(1), atol=1e-6)
    centroids = torch.stack([torch.nn.functional.normalize(ref.z[ref_ids == c].mean(0), dim=0) for c in range(3)])
    assert torch.allclose(got["centroid"], (z @ centroids.T).max(1).values, atol=1e-5)


def test_knn_mean_similarity_in_chunks_equals_one_matmul():
    from metric_ds.open_set import knn_mean_similarity

    torch.manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(37, 6), dim=1)
    db = torch.nn.functional.normalize(torch.randn(53, 6), dim=1)
    want = (q @ db.T).topk(5, dim=1).values.mean(1)
    for qc, dc in ((1024, 8192), (8, 7), (1, 1)):
        torch.testing.assert_close(knn_mean_similarity(q, db, 5, qc, dc), want)
    torch.testing.assert_close(knn_mean_similarity(q, db[:3], 5), (q @ db[:3].T).mean(1))  # k beyond the rows
    assert knn_mean_similarity(q[:0], db, 5).shape == (0,)


def test_threshold_rejects_at_most_the_rate():
    rng = np.random.default_rng(0)
    for n in (1, 7, 20, 101):
        values = rng.normal(size=n)
        for rate in (0.01, 0.05, 0.3):
            t = threshold_for(values, rate)
            assert (values < t).sum() <= rate * n
            assert t == by_hand_threshold(values, rate)
    with pytest.raises(UserError, match="reject_rate"):
        threshold_for([1.0], 1.0)


def test_open_set_metrics_by_hand():
    # 3 known classes; class 3 is unknown
    values = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.6])
    closed = np.array([0, 1, 2, 2, 0, 1])
    labels = np.array([0, 1, 2, 3, 3, 3])
    m = open_set_metrics(values, closed, labels, 3, threshold=0.5)
    # predictions: 0, 1, unknown, 2, unknown, 1
    assert m["accuracy"] == pytest.approx(3 / 6)
    f1 = [1.0, 2 * 1 * 0.5 / 1.5, 0.0, 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)]
    assert m["f1_known"] == pytest.approx(np.mean(f1[:3]))
    assert m["f1_unknown"] == pytest.approx(f1[3])
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # known scores 0.9, 0.8, 0.2 against unknown 0.7, 0.1, 0.6: 7 of 9 pairs ordered
    assert m["auroc"] == pytest.approx(7 / 9)
    # the threshold that accepts 95% of known rows is 0.2 (the lowest): every unknown row above it is accepted
    assert m["fpr_at_95_tpr"] == pytest.approx(2 / 3)
    # macro over the classes present: a known class with no row and no prediction does not count as F1 0
    m = open_set_metrics(np.array([0.9, 0.8, 0.1]), np.array([0, 0, 1]), np.array([0, 0, 3]), 3, threshold=0.5)
    assert (m["accuracy"], m["macro_f1"], m["f1_known"], m["f1_unknown"]) == (1.0, 1.0, 1.0, 1.0)


# ------------------------------------------------------------------------------------------------ calibration


def test_training_calibrates_best_on_the_validation_split_only(tmp_path, tiny_model_dir):
    """The thresholds in best/open_set.json are those of the validation table's rows: computed again here from
    the scores of those rows, and not those of the training rows."""
    from metric_ds.config import validate_config
    from metric_ds.train import Trainer

    train, val = tmp_path / "train.parquet", tmp_path / "val.parquet"
    make_frame(64, seed=0).to_parquet(train)
    make_frame(40, seed=1).to_parquet(val)
    cfg = validate_config({
        "run_name": "os", "model_name": str(tiny_model_dir), "data": {"train_path": str(train), "val_path": str(val)},
        "training": {"batch_size": 8, "num_epochs": 1, "max_steps": 2, "max_seq_length": 16,
                     "supcon_impl": "reference"},
        "model": {"projection_dim": 8},
        "checkpointing": {"checkpoints_dir": str(tmp_path / "runs"), "save_best_by": "loss"},
        "logging": {"backends": ["jsonl"], "progress": "off"},
        "open_set": {"reject_rate": 0.1, "knn_k": 3, "score": "centroid"},
    })
    Trainer(cfg).fit()
    best = tmp_path / "runs" / "os" / "best"
    stored = json.loads((best / OPEN_SET_FILE).read_text())
    assert stored["score"] == "centroid" and stored["knn_k"] == 3 and stored["reject_rate"] == 0.1
    val_texts = set(pd.read_parquet(val)["text"])
    unshared = int((~pd.read_parquet(train)["text"].isin(val_texts)).sum())  # a validation text is no reference row
    assert stored["calibration"]["rows"] == 40 and stored["calibration"]["reference_rows"] == unshared
    model = metric_ds.load(best, device="cpu")
    on_val = model.in_scope_scores(pd.read_parquet(val)["text"])
    on_train = model.in_scope_scores(pd.read_parquet(train)["text"])
    for name in ("msp", "knn", "centroid"):
        assert stored["thresholds"][name] == pytest.approx(by_hand_threshold(on_val[name], 0.1), abs=1e-6)
    assert any(stored["thresholds"][n] != pytest.approx(by_hand_threshold(on_train[n], 0.1), abs=1e-6)
               for n in ("msp", "knn", "centroid"))


def test_a_run_whose_calibration_fails_still_ends_with_its_model(tmp_path, tiny_model_dir, caplog):
    """The unknown label is one of the classes: calibrating cannot work, but the trained model is not lost; the
    warning says how to calibrate."""
    from metric_ds.config import validate_config
    from metric_ds.train import Trainer

    train = tmp_path / "train.parquet"
    make_frame(48, seed=0).to_parquet(train)
    cfg = validate_config({
        "run_name": "os", "model_name": str(tiny_model_dir), "data": {"train_path": str(train)},
        "training": {"batch_size": 8, "max_steps": 1, "max_seq_length": 16, "supcon_impl": "reference"},
        "checkpointing": {"checkpoints_dir": str(tmp_path / "runs"), "save_best_by": "loss"},
        "logging": {"backends": ["jsonl"], "progress": "off"}, "open_set": {"unknown_label": "class_0"},
    })
    Trainer(cfg).fit()
    best = tmp_path / "runs" / "os" / "best"
    assert (best / "heads.json").is_file() and not (best / OPEN_SET_FILE).exists()
    assert "was not calibrated" in caplog.text and "metric-ds calibrate" in caplog.text


def test_calibrate_leaves_out_rows_of_other_labels(calibrated, tmp_path, capsys):
    """Rows labelled 'unknown' or with a label the model does not know never move a threshold."""
    known = make_frame(30, seed=5)
    others = make_frame(90, seed=6).assign(label=["unknown", "class_9", "oos"] * 30)
    others["text"] = "weather forecast " + others["text"]
    table = tmp_path / "val.parquet"
    pd.concat([known, others]).sample(frac=1, random_state=0).to_parquet(table)
    assert cli(["calibrate", "--model", str(calibrated), "--data", str(table), "--reject-rate", "0.1",
                "--knn-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "30 known-class row(s)" in out and "90 row(s) of other labels left out" in out
    stored = json.loads((calibrated / OPEN_SET_FILE).read_text())
    model = metric_ds.load(calibrated, device="cpu")
    on_known = model.in_scope_scores(known["text"])
    on_all = model.in_scope_scores(pd.concat([known, others])["text"])
    for name in ("msp", "knn", "centroid"):
        assert stored["thresholds"][name] == pytest.approx(by_hand_threshold(on_known[name], 0.1), abs=1e-6)
    assert any(stored["thresholds"][n] != pytest.approx(by_hand_threshold(on_all[n], 0.1), abs=1e-6)
               for n in ("msp", "knn", "centroid"))


def test_recalibrating_keeps_the_models_settings_unless_given(calibrated, tmp_path):
    folder = tmp_path / "best"
    shutil.copytree(calibrated, folder)
    table = tmp_path / "val.parquet"
    make_frame(20, seed=2).to_parquet(table)
    assert cli(["calibrate", "--model", str(folder), "--data", str(table), "--score", "centroid", "--knn-k", "2",
                "--unknown-label", "none of these", "--max-reference-rows", "50", "--seed", "7"]) == 0
    assert cli(["calibrate", "--model", str(folder), "--data", str(table), "--reject-rate", "0.2"]) == 0
    stored = json.loads((folder / OPEN_SET_FILE).read_text())
    assert (stored["score"], stored["knn_k"], stored["unknown_label"], stored["reject_rate"]) == \
        ("centroid", 2, "none of these", 0.2)
    c = stored["calibration"]
    assert (c["reference_rows"], c["max_reference_rows"], c["seed"]) == (50, 50, 7)
    # a damaged calibration is replaced, with the defaults
    (folder / OPEN_SET_FILE).write_text(json.dumps({**stored, "unexpected": 1}))
    with pytest.raises(UserError, match="unexpected"):
        metric_ds.load(folder, device="cpu").predict(["card"], reject=True)
    assert cli(["calibrate", "--model", str(folder), "--data", str(table)]) == 0
    assert json.loads((folder / OPEN_SET_FILE).read_text())["score"] == "knn"


def test_calibration_rows_are_left_out_of_the_reference(calibrated, tmp_path):
    """Calibrating on rows that are also reference rows (e.g. the training table): each would find itself at
    similarity 1 and raise the knn threshold; they are left out of the reference and counted."""
    from metric_ds.calibration import calibrate_model

    model = metric_ds.load(calibrated, device="cpu")
    rows = make_frame(40, seed=8).drop_duplicates("text")
    others = make_frame(60, seed=9)
    others = others[~others["text"].isin(set(rows["text"]))]
    found = calibrate_model(model, rows, pd.concat([rows, others]), score="knn", reject_rate=0.1, knn_k=1,
                            unknown_label="unknown", max_reference_rows=1000)
    c = found.settings.calibration
    assert (c["reference_rows_shared_with_data"], c["reference_rows"]) == (len(rows), len(others))
    out = model.forward(rows["text"])
    knn = scores(out["logits"], out["z"], found.reference, 1, which=("knn",))["knn"].numpy()  # rows excluded
    assert found.settings.thresholds["knn"] == pytest.approx(by_hand_threshold(knn, 0.1), abs=1e-6)


def test_calibrate_refuses_an_unknown_label_that_is_a_class(calibrated, tmp_path, capsys):
    table = tmp_path / "val.parquet"
    make_frame(20, seed=2).to_parquet(table)
    assert cli(["calibrate", "--model", str(calibrated), "--data", str(table), "--unknown-label", "class_1"]) == 1
    assert "class_1" in capsys.readouterr().err


def test_calibrate_without_known_rows_is_one_error(calibrated, tmp_path, capsys):
    table = tmp_path / "val.parquet"
    make_frame(20, seed=2).assign(label="oos").to_parquet(table)
    assert cli(["calibrate", "--model", str(calibrated), "--data", str(table)]) == 1
    assert "no row is of a class the model knows" in capsys.readouterr().err


def test_calibrate_into_an_unwritable_model_folder_is_one_error(calibrated, tmp_path, monkeypatch, capsys):
    import errno
    import os

    folder = tmp_path / "best"
    shutil.copytree(calibrated, folder)
    before = (folder / OPEN_SET_FILE).read_text()
    table = tmp_path / "val.parquet"
    make_frame(20, seed=2).to_parquet(table)

    def refuse(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    assert cli(["calibrate", "--model", str(folder), "--data", str(table)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "read-only file system" in err and "Traceback" not in err
    assert (folder / OPEN_SET_FILE).read_text() == before and not list(folder.glob(".*partial*"))


def test_damaged_open_set_file_names_the_file(calibrated, tmp_path):
    folder = tmp_path / "best"
    shutil.copytree(calibrated, folder)
    data = json.loads((folder / OPEN_SET_FILE).read_text())
    data["reject_rate"] = 2
    (folder / OPEN_SET_FILE).write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"{OPEN_SET_FILE}.*reject_rate"):
        metric_ds.load(folder, device="cpu").predict(["card"], reject=True)
    (folder / OPEN_SET_FILE).unlink()
    with pytest.raises(UserError, match="metric-ds calibrate"):
        metric_ds.load(folder, device="cpu").predict(["card"], reject=True)


# ------------------------------------------------------------------------------------------------ predict


def test_predict_rejects_below_the_threshold(calibrated):
    model = metric_ds.load(calibrated, device="cpu")
    texts = make_frame(40, seed=9)["text"].tolist() + ["zzz qqq weather", "what time is it"]
    plain = model.predict(texts)
    for score in ("msp", "knn", "centroid"):
        pred = model.predict(texts, reject=True, score=score)
        threshold = model.open_set.settings.thresholds[score]
        assert pred.score_name == score
        assert np.array_equal(pred.rejected, pred.in_scope_scores < threshold)
        assert np.allclose(pred.in_scope_scores, model.in_scope_scores(texts, which=[score])[score])
        for label, original, rejected in zip(pred.labels, plain.labels, pred.rejected, strict=True):
            assert label == ("unknown" if rejected else original)
    default = model.predict(texts, reject=True)
    assert default.score_name == model.open_set.settings.score


def test_predict_cli_reject_writes_the_score(calibrated, tmp_path):
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    texts = make_frame(12, seed=3)["text"].tolist() + ["", "the weather tomorrow"]
    pd.DataFrame({"text": texts}).to_csv(inp, index=False)
    assert cli(["predict", "--model", str(calibrated), "--input", str(inp), "--output", str(out), "--reject",
                "--score", "centroid"]) == 0
    df = pd.read_csv(out)
    model = metric_ds.load(calibrated, device="cpu")
    want = model.predict(texts[:12] + texts[13:], reject=True, score="centroid")
    got = df.drop(index=12)
    assert got["pred_label"].tolist() == want.labels
    assert np.allclose(got["in_scope_score"], want.in_scope_scores, atol=1e-6)
    assert df["in_scope_score"].isna().tolist() == [False] * 12 + [True, False]


def test_predict_cli_score_needs_reject(calibrated, tmp_path, capsys):
    inp = tmp_path / "in.csv"
    pd.DataFrame({"text": ["card"]}).to_csv(inp, index=False)
    assert cli(["predict", "--model", str(calibrated), "--input", str(inp), "--output", str(tmp_path / "o.csv"),
                "--score", "knn"]) == 1
    assert "add --reject" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_unknown_label_reports_open_intent_metrics(calibrated, tmp_path):
    from metric_ds.commands.evaluate import evaluate

    known = make_frame(24, seed=11)
    unknown = make_frame(12, seed=12).assign(label=["oos", "class_7"] * 6)
    table = tmp_path / "test.parquet"
    pd.concat([known, unknown]).to_parquet(table)
    with pytest.raises(UserError, match="--unknown-label"):
        evaluate(calibrated, table, device="cpu")
    with pytest.raises(UserError, match="one of the model's classes"):
        evaluate(calibrated, table, device="cpu", unknown_label="class_1")
    res = evaluate(calibrated, table, device="cpu", unknown_label="oos")
    os_res = res["open_set"]
    assert os_res["known_rows"] == 24 and os_res["unknown_rows"] == 12
    assert set(os_res["scores"]) == {"msp", "knn", "centroid"}
    model = metric_ds.load(calibrated, device="cpu")
    names = model.labels
    labels = np.array([names.index(x) if x in names else len(names) for x in pd.concat([known, unknown])["label"]])
    closed = model.predict(pd.concat([known, unknown])["text"]).probabilities.argmax(1)
    for name, m in os_res["scores"].items():
        values = model.in_scope_scores(pd.concat([known, unknown])["text"], which=[name])[name]
        want = open_set_metrics(values, closed, labels, len(names), model.open_set.settings.thresholds[name])
        for key in ("accuracy", "macro_f1", "f1_known", "f1_unknown", "auroc", "fpr_at_95_tpr"):
            assert m[key] == pytest.approx(want[key], abs=1e-6), (name, key)
    # the closed-set metrics count the known rows only
    assert res["accuracy"] == pytest.approx(os_res["closed_accuracy_known"])


def test_evaluate_cli_unknown_label(calibrated, tmp_path, capsys):
    table, out = tmp_path / "test.parquet", tmp_path / "eval.json"
    pd.concat([make_frame(16, seed=1), make_frame(8, seed=2).assign(label="oos")]).to_parquet(table)
    assert cli(["evaluate", "--model", str(calibrated), "--data", str(table), "--unknown-label", "oos",
                "--output", str(out)]) == 0
    assert "F1 unknown" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["open_set"]["scores"]) == {"msp", "knn", "centroid"}


# ------------------------------------------------------------------------------------------------ new classes


def test_new_class_joins_the_bank_without_retraining(calibrated, tmp_path):
    """A handful of labelled rows of a class the model never saw, added to the bank: the k-NN vote (library and
    predict --bank-data) finds that class for texts like them."""
    model = metric_ds.load(calibrated, device="cpu")
    train = make_frame(48, seed=0)
    new = pd.DataFrame({"text": [f"crypto wallet bitcoin {w}" for w in ("one", "two", "three", "four", "five")],
                        "label": "crypto"})
    bank = model.build_bank(pd.concat([train["text"], new["text"]]), pd.concat([train["label"], new["label"]]))
    assert "crypto" in bank.label_map.names and "crypto" not in model.labels
    votes = model.knn(new["text"], bank, k=1)
    assert votes.labels == ["crypto"] * 5
    bank_table, inp, out = tmp_path / "bank.csv", tmp_path / "in.csv", tmp_path / "out.csv"
    pd.concat([train[["text", "label"]], new]).to_csv(bank_table, index=False)
    new[["text"]].to_csv(inp, index=False)
    assert cli(["predict", "--model", str(calibrated), "--input", str(inp), "--output", str(out),
                "--bank-data", str(bank_table), "--knn-k", "1"]) == 0
    assert pd.read_csv(out)["knn_label"].tolist() == ["crypto"] * 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rejection_on_the_gpu_matches_the_cpu(calibrated):
    """The scores run on the model's device (the reference rows moved there once): same answers as on the CPU."""
    texts = make_frame(40, seed=9)["text"].tolist() + ["the weather tomorrow"]
    on_cpu = metric_ds.load(calibrated, device="cpu").in_scope_scores(texts)
    gpu = metric_ds.load(calibrated, device="cuda")
    assert gpu.open_set.reference.z.is_cuda
    on_gpu = gpu.in_scope_scores(texts)
    for name in on_cpu:
        np.testing.assert_allclose(on_gpu[name], on_cpu[name], atol=1e-4, rtol=0)
