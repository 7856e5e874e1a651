"""The best-keeper: which validation is better, rank 0's decision, and the export to best/."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import make_cfg, make_frame, run, tmpfs

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


def test_a_full_disk_on_the_first_export_says_there_is_no_best_yet(trainer, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, not an OSError."""
    from safetensors import SafetensorError

    def full_disk(folder, *args, **kwargs):
        (folder / "model.safetensors").parent.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(best_mod, "write_best", full_disk)
    with pytest.raises(UserError) as exc:
        trainer.best.save({"val/loss": 1.0}, 1)
    message = str(exc.value)
    assert f"could not export best/ to {trainer.run_dir}: no space left on device (there is no best/ yet)" in message
    assert "previous best/ is intact" not in message and "checkpointing.checkpoints_dir" in message
    assert not any(p.name in ("best", ".tmp-best", ".old-best") for p in trainer.run_dir.iterdir())


def test_a_full_disk_while_writing_best_is_one_error(tmp_path, tiny_model_dir, tiny_table):
    """A real full disk: the run folder on a small tmpfs (where the test may mount one), no periodic checkpoints."""
    with tmpfs(tmp_path / "small") as mnt:
        with pytest.raises(UserError, match=r"could not export best/ to .*: no space left on device "
                                            r"\(there is no best/ yet\)"):
            run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=2, training__eval_every_n_steps=1,
                checkpointing__checkpoints_dir=str(mnt), checkpointing__save_every_n_batches=None)
        assert not {"best", ".tmp-best", ".old-best"} & {p.name for p in (mnt / "t").iterdir()}


def _limited_table(tmp_path: Path, labelled_per_class: int) -> Path:
    df = make_frame(160, num_classes=4)
    df["classifier_mask"] = 0
    for label, rows in df.groupby("label").groups.items():
        df.loc[list(rows)[:labelled_per_class], "classifier_mask"] = 1
    path = tmp_path / "limited.parquet"
    df.to_parquet(path)
    return path


def test_few_labelled_rows_still_give_a_best_export(tmp_path, tiny_model_dir):
    table = _limited_table(tmp_path, 3)  # 3 x 0.1 rounds to 0 per class
    trainer, summary = run(tmp_path, tiny_model_dir, table, data__val_ratio=0.1, training__max_steps=2,
                           checkpointing__save_best_by="f1")
    assert (trainer.data.val["classifier_mask"] == 1).sum() >= 1
    assert summary["best_step"] is not None and (Path(summary["best_dir"]) / "heads.safetensors").is_file()


def test_no_labelled_row_to_validate_is_refused_before_training(tmp_path, tiny_model_dir):
    table = _limited_table(tmp_path, 1)
    with pytest.raises(UserError, match="save_best_by is f1, which needs labelled"):
        run(tmp_path, tiny_model_dir, table, data__val_ratio=0.1, checkpointing__save_best_by="f1")
    assert not (tmp_path / "runs" / "t").exists()


def test_a_run_that_never_scores_its_best_metric_fails(tmp_path, tiny_model_dir, tiny_table, monkeypatch):
    import metric_ds.train as train_mod

    real = train_mod.compute_metrics
    monkeypatch.setattr(train_mod, "compute_metrics", lambda *a, **k: {**real(*a, **k), "loss": float("nan")})
    with pytest.raises(UserError, match="no best/ was written"):
        run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=2)


def test_the_best_export_follows_rank_0s_decision(tmp_path, tiny_model_dir, tiny_table, monkeypatch):
    """Ranks whose float metrics differ in the last bit must not disagree on exporting best/ (a collective under
    ZeRO-3): every rank takes rank 0's broadcast decision, even against its own comparison."""
    import metric_ds.best as best_mod

    seen = []

    def rank0_says_no(flag, device):
        seen.append(flag)
        return False

    monkeypatch.setattr(best_mod.D, "broadcast_flag", rank0_says_no)
    with pytest.raises(UserError, match="no best/ was written"):
        run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=2)
    assert seen and seen[0] is True  # this rank's own comparison said "better"
    assert not (tmp_path / "runs" / "t" / "best").exists()
