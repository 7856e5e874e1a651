"""``training.contrastive_batch: accumulated``: an optimizer step over 4 micro-batches of 8 rows takes the gradient of
one batch of 32 rows (gradient caching), with the masks, the bank and ZeRO 0-3."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_cfg, run, weights

from metric_ds.config import validate_config
from metric_ds.grad_cache import accumulated_step
from metric_ds.model import model_inputs
from metric_ds.train import Trainer


def _masked_table(tmp_path: Path) -> Path:
    from conftest import make_frame

    df = make_frame(96)
    df.loc[df.index % 3 == 0, "classifier_mask"] = 0  # rows for SupCon only
    df.loc[df.index % 5 == 0, "metric_mask"] = 0  # rows for CE only
    path = tmp_path / "masked.parquet"
    df.to_parquet(path)
    return path


@pytest.mark.parametrize("stage", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (2, 3))])
def test_four_micro_batches_of_8_equal_one_batch_of_32(tmp_path, no_dropout_model_dir, stage):
    table = _masked_table(tmp_path)
    common = dict(model__classifier_dropout=0.0, training__num_epochs=1, deepspeed__zero_stage=stage,
                  metric_validation__train_bank_steps=2, scheduler__name="constant")
    big, big_summary = run(tmp_path / "big", no_dropout_model_dir, table, training__batch_size=32, **common)
    acc, acc_summary = run(tmp_path / "acc", no_dropout_model_dir, table, training__batch_size=8,
                           training__gradient_accumulation_steps=4, training__contrastive_batch="accumulated",
                           **common)
    assert acc_summary["steps"] == big_summary["steps"] == 3  # 72 rows: windows of 32, 32 and 8
    expected = weights(big)
    for name, tensor in weights(acc).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the bank got every row once, in the same order
    for a, b in zip(acc.bank.copy_live_rows(), big.bank.copy_live_rows()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_with_dropout_the_gradient_is_that_of_one_batch_with_the_same_masks(tmp_path, tiny_model_dir):
    """Dropout on: the accumulated step's gradient equals the gradient of the joint loss over the concatenated
    micro-batches, forwarded with grad under the same RNG stream."""
    cfg = validate_config(make_cfg(tmp_path, tiny_model_dir, _masked_table(tmp_path), training__batch_size=8,
                                   training__gradient_accumulation_steps=4,
                                   training__contrastive_batch="accumulated"))
    trainer = Trainer(cfg)
    trainer.engine.train()
    loader = torch.utils.data.DataLoader(trainer.train_ds, batch_sampler=trainer.sampler, collate_fn=trainer.collator)
    batches = [b for _, b in zip(range(4), loader)]
    module = trainer.engine.module
    start = torch.get_rng_state()

    # the definition: one graph over the 32 rows
    outs = [module(**model_inputs(b)) for b in batches]
    cat = {k: torch.cat([b[k] for b in batches]) for k in ("labels", "classifier_mask", "metric_mask")}
    terms = trainer.loss_fn(torch.cat([o.logits for o in outs]), torch.cat([o.z for o in outs]), cat["labels"],
                            cat["classifier_mask"], cat["metric_mask"])
    params = [p for p in module.parameters() if p.requires_grad]
    expected = torch.autograd.grad(terms.backward_loss, params, allow_unused=True, materialize_grads=True)

    torch.set_rng_state(start)
    grads: list[torch.Tensor] = []
    trainer.engine.step = lambda *a, **k: None  # keep the accumulated gradients for reading
    accumulated_step(trainer.engine, trainer.loss_fn, batches,
                     before_step=lambda: grads.extend(torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                      for p in params))  # None: unused (the pooler)
    assert len(grads) == len(expected)
    for g, e, (name, _) in zip(grads, expected, [(n, p) for n, p in module.named_parameters() if p.requires_grad]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=name)


def _label_free_table(tmp_path: Path) -> Path:
    from conftest import make_label_free_frame

    df = make_label_free_frame(96)
    df.loc[df.index % 5 == 0, ["metric_mask", "classifier_mask"]] = [0, 1]  # rows for CE only
    df.loc[df.index % 5 == 0, "label"] = "class_0"
    path = tmp_path / "label_free.parquet"
    df.to_parquet(path)
    return path


def test_label_free_rows_four_micro_batches_of_8_equal_one_batch_of_32(tmp_path, no_dropout_model_dir):
    """Without dropout a view equals its row (up to rounding: it is padded to its own rows' longest), so the
    accumulated window, whose contrast set holds every micro-batch's label-free rows and views, equals one batch."""
    table = _label_free_table(tmp_path)
    common = dict(model__classifier_dropout=0.0, training__num_epochs=1, training__label_free_weight=0.5,
                  metric_validation__train_bank_steps=2, scheduler__name="constant", training__supcon_impl="fused")
    big, _ = run(tmp_path / "big", no_dropout_model_dir, table, training__batch_size=32, **common)
    acc, _ = run(tmp_path / "acc", no_dropout_model_dir, table, training__batch_size=8,
                 training__gradient_accumulation_steps=4, training__contrastive_batch="accumulated", **common)
    expected = weights(big)
    for name, tensor in weights(acc).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(acc.bank.copy_live_rows(), big.bank.copy_live_rows()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(big.bank.copy_live_rows()[2].max()) < big.label_map.num_classes  # labelled rows only


def test_label_free_rows_with_dropout_the_gradient_is_that_of_one_batch_with_the_same_masks(tmp_path,
                                                                                             tiny_model_dir):
    """Dropout on: each micro-batch's forward and then its view's draw the same masks in the accumulated step's
    passes as in one graph over the window's rows and views forwarded in that order."""
    from metric_ds.steps import rows_and_batch
    from metric_ds.views import forward_view, view_inputs

    cfg = validate_config(make_cfg(tmp_path, tiny_model_dir, _label_free_table(tmp_path), training__batch_size=8,
                                   training__gradient_accumulation_steps=4, training__contrastive_batch="accumulated",
                                   training__label_free_weight=2.0))
    trainer = Trainer(cfg)
    trainer.engine.train()
    loader = torch.utils.data.DataLoader(trainer.train_ds, batch_sampler=trainer.sampler, collate_fn=trainer.collator)
    batches = [b for _, b in zip(range(4), loader)]
    views = [view_inputs(b, trainer.device) for b in batches]
    assert sum(v is not None for v in views) >= 3
    rows, batches = rows_and_batch(batches, trainer.device)
    module = trainer.engine.module
    start = torch.get_rng_state()

    outs, z_views = [], []
    for b, v in zip(batches, views):
        outs.append(module(**model_inputs(b)))
        if v is not None:
            z_views.append(forward_view(module, v))
    cat = {k: torch.cat([b[k] for b in batches]) for k in ("labels", "classifier_mask", "metric_mask")}
    terms = trainer.loss_fn(torch.cat([o.logits for o in outs]), torch.cat([o.z for o in outs]), cat["labels"],
                            cat["classifier_mask"], cat["metric_mask"], rows, z_view=torch.cat(z_views))
    assert terms.counts.free_rows > 0
    params = [p for p in module.parameters() if p.requires_grad]
    expected = torch.autograd.grad(terms.backward_loss, params, allow_unused=True, materialize_grads=True)

    torch.set_rng_state(start)
    grads: list[torch.Tensor] = []
    trainer.engine.step = lambda *a, **k: None
    result = accumulated_step(trainer.engine, trainer.loss_fn, batches, rows=rows, views=views,
                              before_step=lambda: grads.extend(torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                               for p in params))
    torch.testing.assert_close(result.terms.backward_loss, terms.backward_loss.detach(), rtol=1e-6, atol=1e-7)
    for g, e, (name, _) in zip(grads, expected, [(n, p) for n, p in module.named_parameters() if p.requires_grad]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=name)
