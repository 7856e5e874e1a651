"""The best-keeper: which validation is better, rank 0's decision, and the export to best/."""
from __future__ import annotations

import errno
import json

import pytest
import torch
from conftest import make_cfg

import metric_ds.best as best_mod
from metric_ds.best import full_state_dict, is_better
from metric_ds.config import validate_config
from metric_ds.errors import UserError
from metric_ds.train import Trainer

NAN = float("nan")


@pytest.mark.parametrize("key, value, best, expected", [
    ("loss", 1.0, None, True), ("loss", 1.0, 2.0, True), ("loss", 2.0, 1.0, False), ("loss", 1.0, 1.0, False),
    ("acc", 0.9, 0.8, True), ("acc", 0.8, 0.9, False), ("acc", 0.9, 0.9, False), ("knn_f1", 0.1, None, True),
    ("acc", None, 0.5, False), ("acc", None, None, False), ("loss", NAN, None, False), ("loss", NAN, 1.0, False),
])
def test_is_better(key, value, best, expected):
    assert is_better(value, best, key) is expected


@pytest.fixture
def trainer(tmp_path, tiny_model_dir, tiny_table):
    return Trainer(validate_config(make_cfg(tmp_path, tiny_model_dir, tiny_table)))


def test_the_decision_is_rank_0s(trainer, monkeypatch):
    said = []

    def broadcast(flag, device):
        said.append(flag)
        return not flag  # rank 0 says the opposite of this rank

    monkeypatch.setattr(best_mod.D, "broadcast_flag", broadcast)
    assert trainer.best.improved({"loss": 1.0}, 2.0) is False and said == [True]
    assert trainer.best.improved({"acc": 1.0}, 2.0) is True and said == [True, False]  # loss missing: not better


def test_save_exports_the_full_weights_and_the_record(trainer):
    trainer.best.save({"val/loss": 1.5}, 7)
    best = trainer.run_dir / "best"
    assert json.loads((best / "metrics.json").read_text()) == {"step": 7, "val/loss": 1.5}
    assert {"heads.safetensors", "labels.json", "metric_ds_config.yaml", "training_data.json",
            "tokenizer.json"} <= {p.name for p in best.iterdir()}
    weights = full_state_dict(trainer.engine.module, 0)
    for name, tensor in trainer.engine.module.state_dict().items():
        assert torch.equal(weights[name], tensor.cpu()), name


def test_a_failed_export_keeps_the_previous_best(trainer, monkeypatch):
    trainer.best.save({"val/loss": 2.0}, 1)

    def full_disk(folder, *args, **kwargs):
        (folder / "partial").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(best_mod, "write_best", full_disk)
    with pytest.raises(UserError, match="could not export best/ .*the previous best/ is intact"):
        trainer.best.save({"val/loss": 1.0}, 2)
    assert json.loads((trainer.run_dir / "best" / "metrics.json").read_text())["step"] == 1
