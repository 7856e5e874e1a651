"""The joint loss: ``classification_loss_weight * CE + metric_loss_weight * SupCon``, as a dict of terms.

* CE is the mean over the rows with ``classifier_mask = 1`` (0, graph kept, when there are none).
* SupCon is defined once, in :mod:`metric_ds.ops.reference`, over the rows with ``metric_mask = 1``.

With W > 1 ranks and ``supcon_scope = global`` the loss equals the one a single process would compute on the
concatenated global batch: metric rows are gathered from every rank (with autograd), each rank's anchors are its
own rows against the whole contrast set, and both terms are normalised by global row/anchor counts. DeepSpeed
averages gradients over ranks, so the loss that is back-propagated is multiplied by W
(:func:`data_parallel_scale`); the parameter gradients then equal the single-process ones. (Asking DeepSpeed to
sum instead is refused under ZeRO-3.)

:meth:`JointLoss.forward` reads top to bottom: the counts of every rank (one small gather), CE, the contrast
set, SupCon, the ×W scaling, and the detached statistics for logging (:func:`positive_stats`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metric_ds import distributed as D
from metric_ds import ops
from metric_ds.ops.reference import positives_per_row


@dataclass
class BatchCounts:
    """Every rank's row counts of one micro-batch, from one gather.

    Attributes:
        rows: all rows, summed over ranks.
        ce_rows: rows with ``classifier_mask``, summed over ranks.
        metric_sizes: rows with ``metric_mask`` on each rank, in rank order.
    """

    rows: int
    ce_rows: int
    metric_sizes: list[int]

    @classmethod
    def gather(cls, rows: int, ce_rows: int, metric_rows: int, device: torch.device) -> BatchCounts:
        counts = D.all_gather_counts([rows, ce_rows, metric_rows], device)
        return cls(int(counts[:, 0].sum()), int(counts[:, 1].sum()), counts[:, 2].tolist())


@dataclass
class ContrastSet:
    """The rows SupCon contrasts, and which of them are this rank's anchors."""

    z: torch.Tensor
    labels: torch.Tensor
    anchor_start: int
    anchor_count: int


def contrast_set(z_m: torch.Tensor, y_m: torch.Tensor, metric_sizes: list[int], scope: str) -> ContrastSet:
    """This rank's metric rows, or (``global`` scope, W > 1) every rank's, gathered with autograd in rank order."""
    if scope == "global" and D.world_size() > 1:
        return ContrastSet(D.gather_rows(z_m, metric_sizes, with_grad=True),
                           D.gather_rows(y_m, metric_sizes, with_grad=False),
                           sum(metric_sizes[: D.rank()]), z_m.shape[0])
    return ContrastSet(z_m, y_m, 0, z_m.shape[0])


def data_parallel_scale(scope: str) -> tuple[int, int]:
    """The factors ``(ce, supcon)`` that undo DeepSpeed's averaging of gradients over W ranks.

    Both CE and global-scope SupCon are normalised by global counts, so each rank's loss is a share of the global
    loss and its gradient must be summed, not averaged: ×W. Local-scope SupCon is each rank's own mean, which
    DeepSpeed's average already combines as classic data parallelism does: ×1.
    """
    world = D.world_size()
    return world, (world if scope == "global" else 1)


def positive_stats(pos_per_row: torch.Tensor, metric_rows: int, scope: str) -> tuple[float, float]:
    """Share of metric rows with a positive, and mean positives per row, over every rank's rows.

    With the global scope every rank already holds the global contrast set; with the local scope each rank's
    counts are summed over ranks.
    """
    if not metric_rows:
        return 0.0, 0.0
    stats = torch.stack([(pos_per_row > 0).sum(), pos_per_row.sum()]).double() if pos_per_row.numel() else \
        torch.zeros(2, dtype=torch.float64, device=pos_per_row.device)
    if scope == "local" and D.world_size() > 1:
        stats = D.all_reduce_sum(stats)
    with_pos, pos_sum = stats.tolist()
    return with_pos / metric_rows, pos_sum / metric_rows


class JointLoss(nn.Module):
    """CE + SupCon.

    Args:
        classification_loss_weight: weight of CE.
        metric_loss_weight: weight of SupCon.
        temperature: SupCon temperature.
        supcon_impl: ``auto|fused|reference`` (see :func:`metric_ds.ops.supcon_loss`).
        supcon_scope: ``global`` (negatives from every rank) or ``local`` (this rank's micro-batch only).
    """

    def __init__(
        self,
        classification_loss_weight: float = 1.0,
        metric_loss_weight: float = 1.0,
        temperature: float = 0.07,
        supcon_impl: str = "auto",
        supcon_scope: str = "global",
    ):
        super().__init__()
        self.ce_weight = classification_loss_weight
        self.metric_weight = metric_loss_weight
        self.temperature = temperature
        self.supcon_impl = supcon_impl
        self.supcon_scope = supcon_scope

    def forward(
        self,
        logits: torch.Tensor,
        z: torch.Tensor,
        labels: torch.Tensor,
        classifier_mask: torch.Tensor,
        metric_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Compute the terms.

        Shape:
            logits: (B, C); z: (B, D) unit norm; labels, classifier_mask, metric_mask: (B,).

        Returns:
            ``backward_loss`` (what to back-propagate: the loss scaled by W for DeepSpeed's gradient averaging,
            see :func:`data_parallel_scale`), ``total`` (the global weighted loss, detached, for logging),
            ``ce``, ``supcon``, ``rows`` (every rank's rows), ``ce_rows``, ``metric_rows``, ``anchor_pos_frac``
            (share of metric rows with a positive) and ``mean_pos_per_anchor``; all but ``backward_loss`` are
            detached global values.
        """
        scope, world = self.supcon_scope, D.world_size()
        ce_idx = classifier_mask.nonzero().squeeze(1)
        m_idx = metric_mask.nonzero().squeeze(1)
        counts = BatchCounts.gather(labels.shape[0], ce_idx.numel(), m_idx.numel(), z.device)

        # CE: the sum over local rows, divided by the global row count.
        ce_part = F.cross_entropy(logits[ce_idx].float(), labels[ce_idx], reduction="sum") / max(counts.ce_rows, 1)

        # SupCon: this rank's anchors against the contrast set, normalised by the valid anchors of all ranks.
        cs = contrast_set(z[m_idx], labels[m_idx], counts.metric_sizes, scope)
        pos_per_row = positives_per_row(cs.labels)
        if cs.z.shape[0] > 0:
            supcon_part, _ = ops.supcon_loss(
                cs.z, cs.labels, self.temperature, anchor_start=cs.anchor_start, anchor_count=cs.anchor_count,
                num_valid_global=int((pos_per_row > 0).sum()), impl=self.supcon_impl,
            )
        else:
            supcon_part = z.sum() * 0.0

        ce_scale, supcon_scale = data_parallel_scale(scope)
        backward_loss = ce_scale * self.ce_weight * ce_part + supcon_scale * self.metric_weight * supcon_part

        # Global values for logging: each rank holds a share that sums to the global term.
        supcon_share = supcon_part.detach() / (1 if scope == "global" else world)
        ce_g, supcon_g = D.all_reduce_sum(torch.stack([ce_part.detach(), supcon_share.float()]))
        metric_rows = sum(counts.metric_sizes)
        anchor_pos_frac, mean_pos = positive_stats(pos_per_row, metric_rows, scope)
        return {
            "backward_loss": backward_loss,
            "total": (self.ce_weight * ce_g + self.metric_weight * supcon_g).detach(),
            "ce": ce_g,
            "supcon": supcon_g,
            "rows": torch.tensor(float(counts.rows)),
            "ce_rows": torch.tensor(float(counts.ce_rows)),
            "metric_rows": torch.tensor(float(metric_rows)),
            "anchor_pos_frac": torch.tensor(anchor_pos_frac),
            "mean_pos_per_anchor": torch.tensor(mean_pos),
        }
