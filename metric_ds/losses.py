"""The joint loss: ``classification_loss_weight * CE + metric_loss_weight * SupCon``, as a dict of terms.

* CE is the mean over the rows with ``classifier_mask = 1`` (0, graph kept, when there are none).
* SupCon is defined once, in :mod:`metric_ds.ops.reference`, over the rows with ``metric_mask = 1``.

With W > 1 ranks and ``supcon_scope = global`` the loss equals the one a single process would compute on the
concatenated global batch: metric rows are gathered from every rank (with autograd), each rank's anchors are its
own rows against the whole contrast set, and both terms are normalised by global row/anchor counts. DeepSpeed
averages gradients over ranks, so the loss that is back-propagated is multiplied by W; the parameter gradients
then equal the single-process ones. (Asking DeepSpeed to sum instead is refused under ZeRO-3.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metric_ds import distributed as D
from metric_ds import ops


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
            ``loss`` (what to back-propagate: already scaled by W for DeepSpeed's gradient averaging),
            ``total`` (the global weighted loss, detached, for logging), ``ce``, ``supcon``, ``ce_rows``,
            ``metric_rows``, ``anchor_pos_frac`` (share of metric rows with a positive) and
            ``mean_pos_per_anchor``; all but ``loss`` are detached global values.
        """
        world = D.world_size()
        ce_idx = classifier_mask.nonzero().squeeze(1)
        m_idx = metric_mask.nonzero().squeeze(1)
        counts = D.all_gather_counts([int(ce_idx.numel()), int(m_idx.numel())], z.device)
        ce_rows_global = int(counts[:, 0].sum())
        metric_sizes = counts[:, 1].tolist()

        # CE: sum over local rows, divided by the global row count.
        ce_sum = F.cross_entropy(logits[ce_idx].float(), labels[ce_idx], reduction="sum")
        ce_part = ce_sum / max(ce_rows_global, 1)

        # SupCon.
        z_m, y_m = z[m_idx], labels[m_idx]
        if self.supcon_scope == "global" and world > 1:
            contrast = D.gather_rows(z_m, metric_sizes, with_grad=True)
            contrast_labels = D.gather_rows(y_m, metric_sizes, with_grad=False)
            start = sum(metric_sizes[: D.rank()])
        else:
            contrast, contrast_labels, start = z_m, y_m, 0
        label_counts = torch.bincount(contrast_labels, minlength=1) if contrast_labels.numel() else None
        if label_counts is not None:
            pos_per_row = label_counts[contrast_labels] - 1
            valid_total = int((pos_per_row > 0).sum())
        else:
            pos_per_row, valid_total = contrast_labels.new_zeros(0), 0
        if contrast.shape[0] > 0:
            supcon_part, _ = ops.supcon_loss(
                contrast, contrast_labels, self.temperature, anchor_start=start, anchor_count=z_m.shape[0],
                num_valid_global=valid_total, impl=self.supcon_impl,
            )
        else:
            supcon_part = z.sum() * 0.0

        scope_scale = world if self.supcon_scope == "global" else 1
        loss = world * self.ce_weight * ce_part + scope_scale * self.metric_weight * supcon_part
        # Global values for logging: each rank holds a share that sums to the global term.
        supcon_share = supcon_part.detach() / (1 if self.supcon_scope == "global" else world)
        shares = D.all_reduce_sum(torch.stack([ce_part.detach(), supcon_share.float()]))
        ce_g, supcon_g = shares[0], shares[1]
        metric_rows = sum(metric_sizes)
        if self.supcon_scope == "local" and world > 1:
            # local scope: report from local counts summed over ranks
            pos_stats = D.all_reduce_sum(torch.tensor(
                [float((pos_per_row > 0).sum()), float(pos_per_row.sum())], device=z.device))
            with_pos, pos_sum = pos_stats.tolist()
        else:
            with_pos, pos_sum = float((pos_per_row > 0).sum()), float(pos_per_row.sum())
        return {
            "loss": loss,
            "total": (self.ce_weight * ce_g + self.metric_weight * supcon_g).detach(),
            "ce": ce_g,
            "supcon": supcon_g,
            "ce_rows": torch.tensor(float(ce_rows_global)),
            "metric_rows": torch.tensor(float(metric_rows)),
            "anchor_pos_frac": torch.tensor(with_pos / metric_rows if metric_rows else 0.0),
            "mean_pos_per_anchor": torch.tensor(pos_sum / metric_rows if metric_rows else 0.0),
        }
