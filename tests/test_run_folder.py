"""The run folder: a name is not re-run by accident, a kill between the best/ renames is repaired, and a resumed
run keeps one history."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import records, run

from metric_ds import run_folder
from metric_ds.config import validate_config
from metric_ds.errors import UserError


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


def test_a_failed_swap_keeps_the_previous_best(tmp_path, monkeypatch):
    import errno
    import os

    run_dir = tmp_path / "r"
    run_folder.swap_in_best(run_dir, lambda f: (f.mkdir(parents=True), (f / "which").write_text("old")))
    real = os.replace

    def refused(src, dst):  # the rename of the new best/ into place fails, after the old one moved aside
        if Path(src).name == run_folder.TMP_BEST:
            raise OSError(errno.EPERM, "Operation not permitted")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError):
        run_folder.swap_in_best(run_dir, lambda f: (f.mkdir(), (f / "which").write_text("new")))
    assert (run_dir / "best" / "which").read_text() == "old"
    assert sorted(p.name for p in run_dir.iterdir()) == ["best"]


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
