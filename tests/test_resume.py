"""The resume plan: no plan without resume_from, the checkpoint's tag, the position remapped on another world size,
and the refusal of changed settings."""
from __future__ import annotations

import pytest
from conftest import make_cfg, make_frame, run

import metric_ds.resume as resume_mod
from metric_ds.checkpoint import DS_TAG
from metric_ds.config import validate_config
from metric_ds.errors import UserError
from metric_ds.resume import check_resume, plan_resume, remap_position


@pytest.mark.parametrize("position, saved_world, world, micro_per_epoch, expected", [
    (5, 1, 1, 100, 5),  # the same world size: unchanged
    (5, 4, 2, 100, 10),  # 160 rows = 10 micro-batches of 2 x 8
    (5, 2, 3, 100, 3),  # 80 rows: 3 whole global batches of 24, the rest seen again
    (50, 4, 1, 30, 30),  # never past the epoch's end
])
def test_remap_position(monkeypatch, position, saved_world, world, micro_per_epoch, expected):
    monkeypatch.setattr(resume_mod.D, "world_size", lambda: world)
    assert remap_position(position, saved_world, 8, micro_per_epoch) == expected


def test_no_resume_from_is_no_plan(tmp_path, tiny_model_dir, tiny_table):
    cfg = validate_config(make_cfg(tmp_path, tiny_model_dir, tiny_table))
    assert plan_resume(cfg, cfg.run_dir, "any", 10) is None


def test_the_plan_of_a_checkpoint_and_of_one_saved_on_more_processes(tmp_path, tiny_model_dir, tiny_table,
                                                                      monkeypatch, capsys):
    common = dict(training__max_steps=2, checkpointing__save_every_n_batches=2)
    first, _ = run(tmp_path / "a", tiny_model_dir, tiny_table, **common)
    ckpt = first.run_dir / "checkpoints" / "step-2"
    cfg = validate_config(make_cfg(tmp_path / "b", tiny_model_dir, tiny_table, training__resume_from=str(ckpt),
                                   **common))
    plan = plan_resume(cfg, cfg.run_dir, first.data_fingerprint, first.micro_per_epoch)
    assert (plan.checkpoint, plan.tag) == (ckpt, DS_TAG)
    assert plan.client["loop"]["global_step"] == 2 and plan.client["loop"]["batch_in_epoch"] == 2

    real = resume_mod.read_client_state
    monkeypatch.setattr(resume_mod, "read_client_state", lambda path: {**real(path), "world_size": 2})
    plan = plan_resume(cfg, cfg.run_dir, first.data_fingerprint, first.micro_per_epoch)
    assert plan.tag == DS_TAG  # ZeRO 0: every rank saved the whole state
    assert plan.client["loop"]["batch_in_epoch"] == 4  # 2 micro-batches of 2 ranks: 4 of this one
    assert "resuming a checkpoint of 2 process(es) on 1" in capsys.readouterr().out


def test_check_resume_refuses_a_changed_seed_and_allows_safe_changes():
    saved = {"training": {"seed": 1, "log_every_n_steps": 5}}
    check_resume(saved, "f", {"training": {"seed": 1, "log_every_n_steps": 50}}, "f", "ckpt")
    with pytest.raises(UserError) as info:
        check_resume(saved, "f", {"training": {"seed": 2, "log_every_n_steps": 5}}, "g", "ckpt")
    text = "\n".join(info.value.messages)
    assert "training.seed: 1 in the checkpoint, 2 now" in text and "training data differ" in text
    with pytest.warns(UserWarning, match="records no config"):
        check_resume(None, None, {}, "f", "ckpt")


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


def test_check_resume_takes_a_key_newer_than_the_checkpoint_at_its_default_as_no_change():
    """A checkpoint of a version before training.label_free_weight existed resumes with it at its default (what
    that version did), not with another value; open_set.* may change (it only acts after training)."""
    saved = {"training": {"seed": 1}}
    check_resume(saved, "f", {"training": {"seed": 1, "label_free_weight": 1.0}}, "f", "ckpt")
    with pytest.raises(UserError, match=r"training.label_free_weight: None in the checkpoint, 0.5 now"):
        check_resume(saved, "f", {"training": {"seed": 1, "label_free_weight": 0.5}}, "f", "ckpt")
    check_resume({**saved, "open_set": {"score": "knn"}}, "f", {**saved, "open_set": {"score": "msp"}}, "f", "ckpt")


def test_check_resume_compares_the_resolved_model_not_its_spelling(tiny_model_dir):
    from metric_ds.model import default_model_path

    bundled = default_model_path()
    check_resume({"model_name": None}, "f", {"model_name": bundled}, "f", "ckpt")
    check_resume({"model_name": bundled}, "f", {"model_name": None}, "f", "ckpt")
    check_resume({"model_name": str(tiny_model_dir)}, "f", {"model_name": f"{tiny_model_dir}/."}, "f", "ckpt")
    with pytest.raises(UserError, match="model_name: None in the checkpoint"):
        check_resume({"model_name": None}, "f", {"model_name": str(tiny_model_dir)}, "f", "ckpt")
