"""Exactness of the loop: validation never changes training, a resume after a validated step equals the run that
was never stopped, and each epoch ends with its own optimizer step."""
from __future__ import annotations

import pytest
import torch
from conftest import records, run, weights

from metric_ds.train import accumulation_window


def _assert_same_weights(a: dict, b: dict) -> None:
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=0, atol=0, msg=name)


def test_validation_frequency_never_changes_the_weights(tmp_path, tiny_model_dir, tiny_table):
    common = dict(training__max_steps=6, training__num_epochs=3)
    runs = [run(tmp_path / str(every), tiny_model_dir, tiny_table, training__eval_every_n_steps=every, **common)[0]
            for every in (None, 1, 3)]
    trained = [weights(r) for r in runs]
    _assert_same_weights(trained[0], trained[1])
    _assert_same_weights(trained[0], trained[2])


def test_resume_after_a_validated_step_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, tiny_table):
    """The stopped run validated at its last step (4), the uninterrupted one did not: same weights after 6."""
    common = dict(training__max_steps=6, training__num_epochs=3, checkpointing__save_every_n_batches=1,
                  checkpointing__keep_last_n_checkpoints=10)
    full, _ = run(tmp_path / "a", tiny_model_dir, tiny_table, **common)
    stopped, _ = run(tmp_path / "b", tiny_model_dir, tiny_table, training__eval_every_n_steps=4, **common)
    resumed, _ = run(tmp_path / "c", tiny_model_dir, tiny_table,
                     training__resume_from=str(stopped.run_dir / "checkpoints" / "step-4"), **common)
    _assert_same_weights(weights(full), weights(resumed))


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
