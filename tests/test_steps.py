"""The step strategies of ``training.contrastive_batch``: what each call trains and the one output type it gives."""
from __future__ import annotations

import torch
from conftest import make_cfg

from metric_ds.config import validate_config
from metric_ds.losses import JointLoss
from metric_ds.steps import AccumulatedStep, MicroBatchStep, StepOutput, rows_and_batch
from metric_ds.train import Trainer


def _trainer_and_batches(tmp_path, model_dir, table, mode: str, n: int = 2):
    trainer = Trainer(validate_config(make_cfg(tmp_path, model_dir, table, training__gradient_accumulation_steps=n,
                                               training__contrastive_batch=mode, model__projection_dim=8)))
    trainer.engine.train()
    loader = torch.utils.data.DataLoader(trainer.train_ds, batch_sampler=trainer.sampler, collate_fn=trainer.collator)
    return trainer, [b for _, b in zip(range(n), loader)]


def test_micro_step_trains_each_micro_batch_and_steps_at_the_window_end(tmp_path, tiny_model_dir, tiny_table):
    trainer, batches = _trainer_and_batches(tmp_path, tiny_model_dir, tiny_table, "micro")
    assert isinstance(trainer.step, MicroBatchStep)
    first = trainer.step(batches[0], 2, False, False)
    assert trainer.engine.global_steps == 0  # inside the window: no optimizer step yet
    last = trainer.step(batches[1], 2, True, True)
    assert trainer.engine.global_steps == 1
    for out, batch in ((first, batches[0]), (last, batches[1])):
        rows = batch["labels"].shape[0]
        assert isinstance(out, StepOutput) and out.micro_batches == 1 and out.memory == {}
        assert out.terms.counts.rows == rows and out.rows.h.shape[0] == rows
        assert torch.equal(out.rows.metric_rows, batch["metric_mask"].nonzero().squeeze(1))
        assert out.rows.sizes == [int(batch["metric_mask"].sum())] and not out.rows.local
        assert torch.equal(out.rows.z, out.terms.contrast.z) and torch.equal(out.rows.labels, out.terms.contrast.labels)
    assert first.grad_norm is None  # not a log step
    assert float(last.grad_norm) > 0  # ZeRO 0 in fp32: DeepSpeed reports no norm, the step takes it


def test_accumulated_step_holds_the_window_and_trains_it_as_one_batch(tmp_path, tiny_model_dir, tiny_table):
    trainer, batches = _trainer_and_batches(tmp_path, tiny_model_dir, tiny_table, "accumulated")
    assert isinstance(trainer.step, AccumulatedStep)
    assert trainer.step(batches[0], 2, False, True) is None
    assert trainer.engine.global_steps == 0
    out = trainer.step(batches[1], 2, True, True)
    assert trainer.engine.global_steps == 1 and trainer.step.pending == []
    rows = sum(b["labels"].shape[0] for b in batches)
    assert out.micro_batches == 2 and out.terms.counts.rows == rows and out.rows.h.shape[0] == rows
    window_mask = torch.cat([b["metric_mask"] for b in batches])
    assert torch.equal(out.rows.metric_rows, window_mask.nonzero().squeeze(1))
    assert out.rows.sizes == [int(window_mask.sum())]
    assert float(out.grad_norm) > 0
    assert out.memory == {}  # activation memory is measured on CUDA only


def test_rows_and_batch_finds_the_window_rows_on_the_cpu_masks():
    """The rows of the concatenated masks, in order; the loss given them equals the loss that finds them itself."""
    batches = [{"classifier_mask": torch.tensor([True, False, True]), "metric_mask": torch.tensor([False, True, True]),
                "labels": torch.tensor([0, 1, 1])},
               {"classifier_mask": torch.tensor([False, True]), "metric_mask": torch.tensor([True, True]),
                "labels": torch.tensor([1, 0])}]
    rows, moved = rows_and_batch(batches, torch.device("cpu"))
    assert rows.ce.tolist() == [0, 2, 4] and rows.metric.tolist() == [1, 2, 3, 4] and len(moved) == 2
    cat = {k: torch.cat([b[k] for b in moved]) for k in batches[0]}
    torch.manual_seed(0)
    logits, z = torch.randn(5, 2), torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    loss = JointLoss(num_classes=2, supcon_impl="reference")
    given = loss(logits, z, cat["labels"], cat["classifier_mask"], cat["metric_mask"], rows)
    found = loss(logits, z, cat["labels"], cat["classifier_mask"], cat["metric_mask"])
    assert torch.equal(given.backward_loss, found.backward_loss) and torch.equal(given.shares, found.shares)
