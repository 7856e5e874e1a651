"""Runs that can be trusted: validation never changes training, run folders cannot be mixed up, checkpoints are
verified before use, resumes refuse changes that break the run, and failures are clear errors."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_frame, records, run

from metric_ds import run_folder
from metric_ds.checkpoint import resolve_resume
from metric_ds.config import apply_overrides, validate_config
from metric_ds.errors import UserError
from metric_ds.train import accumulation_window


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def _assert_same_weights(a: dict, b: dict) -> None:
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------ 1. validation and RNG


def test_validation_frequency_never_changes_the_weights(tmp_path, tiny_model_dir, tiny_table):
    common = dict(training__max_steps=6, training__num_epochs=3)
    runs = [run(tmp_path / str(every), tiny_model_dir, tiny_table, training__eval_every_n_steps=every, **common)[0]
            for every in (None, 1, 3)]
    weights = [_weights(r) for r in runs]
    _assert_same_weights(weights[0], weights[1])
    _assert_same_weights(weights[0], weights[2])


def test_resume_after_a_validated_step_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, tiny_table):
    """The stopped run validated at its last step (4), the uninterrupted one did not: same weights after 6."""
    common = dict(training__max_steps=6, training__num_epochs=3, checkpointing__save_every_n_batches=1,
                  checkpointing__keep_last_n_checkpoints=10)
    full, _ = run(tmp_path / "a", tiny_model_dir, tiny_table, **common)
    stopped, _ = run(tmp_path / "b", tiny_model_dir, tiny_table, training__eval_every_n_steps=4, **common)
    resumed, _ = run(tmp_path / "c", tiny_model_dir, tiny_table,
                     training__resume_from=str(stopped.run_dir / "checkpoints" / "step-4"), **common)
    _assert_same_weights(_weights(full), _weights(resumed))


# --------------------------------------------------------------------------- 2. best/ needs labelled val rows


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


# ------------------------------------------------------------------------------------- 3. re-running a name


def test_rerunning_a_run_name_is_refused_and_overwrite_starts_afresh(tmp_path, tiny_model_dir, tiny_table):
    first, _ = run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=3,
                   checkpointing__save_every_n_batches=1, checkpointing__keep_last_n_checkpoints=5)
    with pytest.raises(UserError, match="already holds a run"):
        run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=2)
    second, _ = run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=2, checkpointing__overwrite=True,
                    checkpointing__save_every_n_batches=1, checkpointing__keep_last_n_checkpoints=5)
    assert sorted(p.name for p in (second.run_dir / "checkpoints").glob("step-*")) == ["step-1", "step-2"]
    assert max(r["step"] for r in records(second.run_dir)) == 2
    assert (second.run_dir / "checkpoints" / "latest").read_text() == "step-2"


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(UserError, match="contradict"):
        validate_config({"data": {"train_path": "x"}, "training": {"resume_from": "latest"},
                         "checkpointing": {"overwrite": True}})


# -------------------------------------------------------------------------------- 4. verified checkpoints


@pytest.fixture
def checkpointed(tmp_path, tiny_model_dir, tiny_table):
    common = dict(training__max_steps=3, checkpointing__save_every_n_batches=1,
                  checkpointing__keep_last_n_checkpoints=5)
    trainer, _ = run(tmp_path, tiny_model_dir, tiny_table, **common)
    return trainer.run_dir, common


def _flip(path: Path, offset: int, n: int = 256) -> None:
    data = bytearray(path.read_bytes())
    start = min(offset, len(data) - n)
    data[start:start + n] = bytes(255 - b for b in data[start:start + n])
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_refused_or_skipped(checkpointed):
    run_dir, _ = checkpointed
    step3 = run_dir / "checkpoints" / "step-3"
    model_file = next((step3 / "ds").rglob("*model_states.pt"))
    _flip(model_file, 4096)
    with pytest.raises(UserError, match=r"model_states.pt is damaged.*newest complete checkpoint there is .*step-2"):
        resolve_resume(str(step3), run_dir)
    with pytest.warns(UserWarning, match="resuming from step-2"):
        assert resolve_resume("latest", run_dir) == run_dir / "checkpoints" / "step-2"


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_client_state_is_a_clear_error(checkpointed, damage):
    run_dir, _ = checkpointed
    step3 = run_dir / "checkpoints" / "step-3"
    client = step3 / "client_state_rank0.pt"
    if damage == "truncate":
        client.write_bytes(client.read_bytes()[:100])
    elif damage == "delete":
        client.unlink()
    else:
        _flip(client, 200)
    with pytest.raises(UserError, match="client_state_rank0.pt is (truncated|missing|damaged)"):
        resolve_resume(str(step3), run_dir)


def test_corrupt_checkpoint_never_resumes_silently(checkpointed, tiny_model_dir, tiny_table, tmp_path):
    run_dir, common = checkpointed
    for step in (1, 2, 3):
        _flip(next((run_dir / "checkpoints" / f"step-{step}" / "ds").rglob("*model_states.pt")), 2048)
    with pytest.raises(UserError, match="no checkpoint under .* can be loaded"):
        run(tmp_path, tiny_model_dir, tiny_table, training__resume_from="latest", **common)


# ----------------------------------------------------------------------------- 5. config changes on resume


@pytest.mark.parametrize("change, allowed", [
    (dict(training__batch_size=4), False),
    (dict(training__seed=4), False),
    (dict(training__max_steps=5), False),  # linear schedule: its length follows the run's
    (dict(training__max_steps=5, scheduler__name="constant"), None),  # constant: the length may change...
    (dict(training__log_every_n_steps=2, training__eval_every_n_steps=1, data__num_workers=0), True),
])
def test_resume_refuses_changes_that_break_the_run(checkpointed, tiny_model_dir, tiny_table, tmp_path, change,
                                                   allowed):
    run_dir, common = checkpointed
    over = {**common, "training__resume_from": "latest", **change}
    if allowed is None:  # ...but the scheduler name itself changed from the checkpoint's
        with pytest.raises(UserError, match="scheduler.name"):
            run(tmp_path, tiny_model_dir, tiny_table, **over)
        return
    if allowed:
        run(tmp_path, tiny_model_dir, tiny_table, **over)
        return
    key = next(iter(change)).replace("__", ".")
    with pytest.raises(UserError, match=key):
        run(tmp_path, tiny_model_dir, tiny_table, **over)


def test_resume_may_lengthen_a_constant_schedule(tmp_path, tiny_model_dir, tiny_table):
    common = dict(scheduler__name="constant", checkpointing__save_every_n_batches=1)
    first, _ = run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=2, **common)
    _, summary = run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=4, training__resume_from="latest",
                     **common)
    assert summary["steps"] == 4


def test_resume_on_other_data_is_refused(checkpointed, tiny_model_dir, tmp_path):
    run_dir, common = checkpointed
    df = make_frame(96, num_classes=5)  # an extra class
    other = tmp_path / "other.parquet"
    df.to_parquet(other)
    with pytest.raises(UserError, match="training data differ"):
        run(tmp_path, tiny_model_dir, other, training__resume_from="latest", **common)


# ------------------------------------------------------------------------ 6. accumulation and epoch ends


@pytest.mark.parametrize("i, expected", [(0, (3, False)), (2, (3, True)), (6, (2, False)), (7, (2, True))])
def test_accumulation_windows_end_with_the_epoch(i, expected):
    assert accumulation_window(i, 8, 3) == expected


def test_each_epoch_ends_with_its_own_step(tmp_path, tiny_model_dir, tiny_table):
    trainer, summary = run(tmp_path, tiny_model_dir, tiny_table, training__gradient_accumulation_steps=2,
                           training__num_epochs=2)
    micro = len(trainer.sampler)
    assert micro % 2 == 1, "the fixture must give an odd number of micro-batches"
    per_epoch = (micro + 1) // 2
    assert summary["steps"] == trainer.engine.global_steps == 2 * per_epoch
    val_steps = [r["step"] for r in records(trainer.run_dir) if "val/loss" in r]
    assert val_steps == [per_epoch, 2 * per_epoch]
    assert summary["epochs"] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------ 7-9. startup checks


def test_one_class_is_refused(tmp_path, tiny_model_dir):
    df = make_frame(40)
    df["label"] = "only"
    path = tmp_path / "one.parquet"
    df.to_parquet(path)
    with pytest.raises(UserError, match="holds one class"):
        run(tmp_path, tiny_model_dir, path)


def test_max_seq_length_beyond_the_model_is_refused_at_startup(tmp_path, tiny_model_dir, tiny_table):
    with pytest.raises(UserError, match="max_seq_length: 512 is longer than the model .* at most 128"):
        run(tmp_path, tiny_model_dir, tiny_table, training__max_seq_length=512)


def test_unusable_checkpoints_dir_is_refused_at_startup(tmp_path, tiny_model_dir, tiny_table, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        run(tmp_path, tiny_model_dir, tiny_table, checkpointing__checkpoints_dir=str(blocker / "runs"))
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(UserError, match="is not writable"):
        run(tmp_path, tiny_model_dir, tiny_table)


# ------------------------------------------------------------------------------------ 10. failed saves


def test_a_full_disk_during_a_save_is_a_clear_error(tmp_path, tiny_model_dir, tiny_table, monkeypatch):
    import metric_ds.checkpoint as ckpt_mod

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *a, **k):
        calls["n"] += 1
        if "client_state" in str(path) and ".tmp-step-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(UserError) as info:
        run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=3, checkpointing__save_every_n_batches=1)
    msg = info.value.messages[0]
    assert "could not save checkpoint step-2" in msg and "no space left on device" in msg
    assert "the previous checkpoint step-1 is intact" in msg
    root = tmp_path / "runs" / "t" / "checkpoints"
    assert not list(root.glob(".tmp-*")) and (root / "latest").read_text() == "step-1"


# ----------------------------------------------------------------------------------------- 12. best/ swap


@pytest.mark.parametrize("tmp_complete", [True, False])
def test_a_kill_between_the_best_renames_is_repaired(tmp_path, tmp_complete):
    run_dir = tmp_path / "r"
    (run_dir / ".old-best").mkdir(parents=True)
    (run_dir / ".old-best" / "which").write_text("old")
    (run_dir / ".tmp-best").mkdir()
    (run_dir / ".tmp-best" / "which").write_text("new")
    if tmp_complete:
        (run_dir / ".tmp-best" / run_folder.COMPLETE).write_text("")
    run_folder.repair_best(run_dir)
    assert (run_dir / "best" / "which").read_text() == ("new" if tmp_complete else "old")
    assert not (run_dir / ".old-best").exists() and not (run_dir / ".tmp-best").exists()


# --------------------------------------------------------------------------------- 13. one history on resume


def test_resume_keeps_one_history_and_a_finished_run_its_summary(tmp_path, tiny_model_dir, tiny_table):
    common = dict(training__max_steps=4, checkpointing__save_every_n_batches=2, training__eval_every_n_steps=1,
                  checkpointing__keep_last_n_checkpoints=5)
    full, _ = run(tmp_path / "a", tiny_model_dir, tiny_table, **common)
    # the interrupted run: records up to step 4 exist, the newest checkpoint is step 2
    trainer, _ = run(tmp_path / "b", tiny_model_dir, tiny_table, **common)
    shutil.rmtree(trainer.run_dir / "checkpoints" / "step-4")
    (trainer.run_dir / "checkpoints" / "latest").write_text("step-2")
    resumed, summary = run(tmp_path / "b", tiny_model_dir, tiny_table, training__resume_from="latest", **common)
    keys = [(r["step"], "val/loss" in r) for r in records(resumed.run_dir)]
    assert len(keys) == len(set(keys)) == len(records(full.run_dir))
    before = json.loads((resumed.run_dir / "summary.json").read_text())
    again = run(tmp_path / "b", tiny_model_dir, tiny_table, training__resume_from="latest", **common)[1]
    assert again["train_samples_per_s"] == before["train_samples_per_s"] > 0
    assert len(records(resumed.run_dir)) == len(keys)


# ----------------------------------------------------------------------------------- 14-15. config and --set


def test_run_name_cannot_leave_checkpoints_dir():
    for name in ("..", ".", "a/b"):
        with pytest.raises(UserError, match="run_name"):
            validate_config({"data": {"train_path": "x"}, "run_name": name})


@pytest.mark.parametrize("item, key, expected", [
    ("run_name=2024", "run_name", "2024"), ("run_name=no", "run_name", "no"), ("run_name=1.10", "run_name", "1.10"),
    ("training.mixed_precision=no", "training.mixed_precision", "no"),
    ("training.batch_size=16", "training.batch_size", 16),
    ("metric_validation.recall_at_k=[1, 5]", "metric_validation.recall_at_k", [1, 5]),
])
def test_set_values_follow_the_schema_type(item, key, expected):
    cfg = validate_config(apply_overrides({"data": {"train_path": "x"}}, [item]))
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


@pytest.mark.parametrize("item", ["training.batch_size=true", "training.supcon_temperature=yes"])
def test_a_bool_is_not_a_number(item):
    with pytest.raises(UserError, match="expected a number, got true"):
        validate_config(apply_overrides({"data": {"train_path": "x"}}, [item]))


# ------------------------------------------------------------------------------------- 11. evaluate inputs


def test_evaluate_with_a_missing_bank_file_is_an_error(tmp_path, tiny_model_dir, tiny_table):
    from metric_ds.commands.evaluate import evaluate

    trainer, summary = run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=1)
    with pytest.raises(UserError, match="--bank-data: .*nowhere.parquet does not exist"):
        evaluate(summary["best_dir"], tiny_table, bank_data=tmp_path / "nowhere.parquet")


# ------------------------------------------------------------------------- rank 0 decides what is "better"


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
