"""The training step, one strategy per ``training.contrastive_batch`` mode, called once per micro-batch.

* ``micro`` (:class:`MicroBatchStep`): each micro-batch is forwarded, its loss taken over its own rows and
  back-propagated; the optimizer steps at the end of the accumulation window (DeepSpeed's accumulation).
* ``accumulated`` (:class:`AccumulatedStep`): the window's micro-batches are held until its last one, then trained
  as one contrastive batch over all their rows (:mod:`metric_ds.grad_cache`).

Both give the loop a :class:`StepOutput`. Neither reads a value to the host in one process, and only the packed
row counts with W > 1: what is logged stays on the device until the log step (``tests/test_host_syncs.py``). The
rows of each loss term (and of the bank) are found from the collated masks while the batch is still on the CPU
(:func:`rows_and_batch`), so no ``nonzero`` or boolean-mask index runs on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from metric_ds.bank import StepRows
from metric_ds.config import Config
from metric_ds.grad_cache import accumulated_step
from metric_ds.losses import JointLoss, LossTerms, RowIndex
from metric_ds.model import model_inputs
from metric_ds.views import forward_view, view_inputs

Batch = dict[str, torch.Tensor]


@dataclass
class StepOutput:
    """What one step strategy call gives the loop.

    Attributes:
        terms: the loss terms (of one micro-batch, or of a whole accumulated window).
        micro_batches: how many micro-batches ``terms`` stand for (their weight in the logging window).
        grad_norm: the gradient norm before clipping where DeepSpeed reports none (log steps only; a device
            tensor, read at the log step).
        rows: the step's rows for the embedding bank.
        memory: activation-memory figures for the log record (accumulated windows on CUDA, log steps only).
    """

    terms: LossTerms
    micro_batches: int
    grad_norm: torch.Tensor | None
    rows: StepRows
    memory: dict[str, float] = field(default_factory=dict)


def to_device(batch: Batch, device: torch.device) -> Batch:
    # non_blocking copies overlap with compute only from pinned memory (the loaders pin on CUDA)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def rows_and_batch(batches: list[Batch], device: torch.device) -> tuple[RowIndex, list[Batch]]:
    """The row indices of the CPU ``batches``' masks and labels (concatenated, in order), found before the batches
    move, and the indices and batches on ``device``."""
    masks = [torch.cat([b[k] for b in batches]) for k in ("classifier_mask", "metric_mask", "labels")]
    return RowIndex.from_masks(*masks).to(device), [to_device(b, device) for b in batches]


def grad_norm_before_step(engine: Any, cfg: Config) -> torch.Tensor | None:
    """The gradient norm before clipping, where DeepSpeed does not report one (ZeRO 0 in fp32); a device
    tensor, read at the log step."""
    if cfg.deepspeed.zero_stage != 0 or cfg.training.mixed_precision != "no":
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def bank_rows(h: torch.Tensor, rows: RowIndex, terms: LossTerms, loss_fn: JointLoss) -> StepRows:
    """The bank's rows of a step: its pooled ``h`` and metric row indices, and the contrast rows and counts the
    loss gathered."""
    return StepRows(h, rows.metric, terms.contrast.z, terms.contrast.labels, terms.counts.metric_sizes,
                    local=loss_fn.supcon_scope == "local")


class MicroBatchStep:
    """``contrastive_batch: micro``: forward, loss, backward and (at a window's end) the optimizer step of each
    micro-batch."""

    def __init__(self, engine: Any, loss_fn: JointLoss, cfg: Config):
        self.engine, self.loss_fn, self.cfg = engine, loss_fn, cfg

    def __call__(self, batch: Batch, window_len: int, boundary: bool, will_log: bool) -> StepOutput:
        """Train one micro-batch of a window of ``window_len``; ``boundary``: it ends the window (the optimizer
        steps); ``will_log``: the step is logged (the gradient norm is taken)."""
        engine = self.engine
        engine.set_gradient_accumulation_boundary(boundary)
        view = view_inputs(batch, engine.device)
        rows, (batch,) = rows_and_batch([batch], engine.device)
        out = engine(**model_inputs(batch))
        terms = self.loss_fn(out.logits, out.z, batch["labels"], batch["classifier_mask"], batch["metric_mask"],
                             rows, z_view=forward_view(engine, view))
        # DeepSpeed divides by gradient_accumulation_steps; a shorter last window is a mean over its own micro-batches.
        scale = self.cfg.training.gradient_accumulation_steps / window_len
        engine.backward(terms.backward_loss * scale if scale != 1 else terms.backward_loss)
        norm = grad_norm_before_step(engine, self.cfg) if will_log else None
        engine.step()
        return StepOutput(terms, 1, norm, bank_rows(out.h, rows, terms, self.loss_fn))


class AccumulatedStep:
    """``contrastive_batch: accumulated``: the window's micro-batches are held, and at its last one trained as one
    optimizer step whose contrastive batch is every row of the window (:func:`metric_ds.grad_cache.accumulated_step`).
    """

    def __init__(self, engine: Any, loss_fn: JointLoss, cfg: Config):
        self.engine, self.loss_fn, self.cfg = engine, loss_fn, cfg
        self.pending: list[Batch] = []

    def __call__(self, batch: Batch, window_len: int, boundary: bool, will_log: bool) -> StepOutput | None:
        """Hold ``batch``; at the window's end (``boundary``), train the window. None until then."""
        self.pending.append(batch)
        if not boundary:
            return None
        batches, self.pending = self.pending, []
        device = self.engine.device
        norm: list[torch.Tensor | None] = [None]

        def before_step() -> None:
            if will_log:
                norm[0] = grad_norm_before_step(self.engine, self.cfg)

        on_cuda = device.type == "cuda"
        memory: dict[str, float] = {}
        if on_cuda and will_log:
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        views = [view_inputs(b, device) for b in batches]
        rows, on_device = rows_and_batch(batches, device)
        result = accumulated_step(self.engine, self.loss_fn, on_device, before_step, rows, views)
        if on_cuda and will_log:  # the activations of one micro-batch; a micro-batch of all rows needs ~len x that
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            memory = {"train/activation_peak_mb": peak, "train/memory_saved_mb_est": peak * (len(batches) - 1)}
        return StepOutput(result.terms, window_len, norm[0],
                          bank_rows(result.h, rows, result.terms, self.loss_fn), memory)


def make_step(engine: Any, loss_fn: JointLoss, cfg: Config) -> MicroBatchStep | AccumulatedStep:
    """The step strategy of ``training.contrastive_batch``."""
    kind = AccumulatedStep if cfg.training.contrastive_batch == "accumulated" else MicroBatchStep
    return kind(engine, loss_fn, cfg)
