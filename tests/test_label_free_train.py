"""Training with label-free rows end to end: the views train (dropout on, so each view draws its own masks), the
bank and validation see labelled rows only, and a resumed run equals the uninterrupted one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_frame, make_label_free_frame, records, run, weights


@pytest.fixture
def label_free_table(tmp_path) -> Path:
    path = tmp_path / "free.parquet"
    make_label_free_frame(96).to_parquet(path)
    return path


@pytest.mark.parametrize("mode", ["micro", "accumulated"])
def test_resume_with_label_free_rows_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, label_free_table, mode):
    """The views' dropout draws come from the RNG streams the checkpoint restores."""
    common = {"training__max_steps": 6, "training__num_epochs": 3, "checkpointing__save_every_n_batches": 3,
              "checkpointing__keep_last_n_checkpoints": 5, "training__contrastive_batch": mode,
              "training__gradient_accumulation_steps": 2, "training__label_free_weight": 0.7}
    full, _ = run(tmp_path / "a", tiny_model_dir, label_free_table, **common)
    resumed, summary = run(tmp_path / "b", tiny_model_dir, label_free_table,
                           training__resume_from=str(full.run_dir / "checkpoints" / "step-3"), **common)
    assert summary["steps"] == 6
    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if "samples_per_s" not in k and "step_time" not in k}

    assert [strip(r) for r in records(resumed.run_dir)] == [strip(r) for r in records(full.run_dir) if r["step"] > 3]
    expected = weights(full)
    for name, tensor in weights(resumed).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_label_free_rows_train_supcon_and_stay_out_of_validation_and_the_bank(tmp_path, tiny_model_dir,
                                                                            label_free_table):
    trainer, summary = run(tmp_path, tiny_model_dir, label_free_table, training__max_steps=4)
    assert summary["steps"] == 4
    assert trainer.label_map.num_classes == 4 and not trainer.data.val["label"].isna().any()
    recs = [r for r in records(trainer.run_dir) if "train/contrastive_batch" in r]
    assert any(r["train/contrastive_batch"] > r["train/metric_rows"] for r in recs)  # the views
    labels = trainer.bank.copy_live_rows()[2]
    assert len(labels) and int(labels.min()) >= 0 and int(labels.max()) < 4
    assert any("bank/classes_covered" in r for r in records(trainer.run_dir))  # bank statistics computed


def test_a_model_trained_with_label_free_rows_evaluates_votes_and_rejects(tmp_path, tiny_model_dir, label_free_table):
    """Its training table (the default k-NN bank and reference rows) holds rows without a label: evaluate, the k-NN
    vote and the calibration skip them."""
    import json

    import pandas as pd

    import metric_ds
    from metric_ds.cli import main

    trainer, _ = run(tmp_path, tiny_model_dir, label_free_table, training__max_steps=2)
    best = trainer.run_dir / "best"
    stored = json.loads((best / "open_set.json").read_text())
    val_texts = set(trainer.data.val["text"])
    train = trainer.data.train.drop_duplicates(subset=["text", "label"])
    assert stored["calibration"]["reference_rows"] == int((train["label"].notna() & ~train["text"].isin(val_texts)).sum())
    labelled = tmp_path / "labelled.parquet"
    table = pd.read_parquet(label_free_table)
    table[table["label"].notna()].to_parquet(labelled)
    assert main(["evaluate", "--model", str(best), "--data", str(labelled), "--device", "cpu",
                 "--output", str(tmp_path / "eval.json")]) == 0
    assert "retrieval" in json.loads((tmp_path / "eval.json").read_text())
    model = metric_ds.load(best, device="cpu")
    assert set(model.knn(["card"], k=3).labels) <= set(model.labels)
    val = tmp_path / "val.parquet"
    make_frame(16, seed=5).to_parquet(val)
    assert main(["calibrate", "--model", str(best), "--data", str(val), "--reference-data",
                 str(label_free_table)]) == 0
