"""The joint loss: ``classification_loss_weight * CE + metric_loss_weight * SupCon``, and its logged terms.

* CE is the mean over the rows with ``classifier_mask = 1`` (0, graph kept, when there are none).
* SupCon is defined once, in :mod:`metric_ds.ops.reference`, over the rows with ``metric_mask = 1``.

With W > 1 ranks and ``supcon_scope = global`` the loss equals the one a single process would compute on the
concatenated global batch: metric rows are gathered from every rank (with autograd), each rank's anchors are its
own rows against the whole contrast set, and both terms are normalised by global row/anchor counts. DeepSpeed
averages gradients over ranks, so the loss that is back-propagated is multiplied by W
(:func:`data_parallel_scale`); the parameter gradients then equal the single-process ones. (Asking DeepSpeed to
sum instead is refused under ZeRO-3.)

**Label-free rows** (``labels`` = :data:`~metric_ds.data.labels.LABEL_FREE`, ``metric_mask = 1``; never CE rows)
take part in SupCon each as its own class, the SimCSE case of SupCon: its positive is ``z_view``, a second forward
of the same tokens (another dropout mask), and every other row is its negative. Each rank's block of the contrast
set is then its labelled metric rows, its label-free rows, and their views, in that order; a label-free row and its
view share a fresh class id ``num_classes + j``, ``j`` counting the label-free rows of every rank in rank order (so
the ids are unique and paired in the gathered set). The loss stays one SupCon mean, with label-free anchors weighted
by ``label_free_weight`` (w): ``(sum_l + w sum_f) / (N_l + w N_f)`` over the valid labelled anchors ``l`` and the
label-free anchors ``f`` (rows and views) of every rank; the op is called twice on the same contrast set, once per
anchor slice. A batch without label-free rows (on every rank) computes exactly as without this feature.

No host-device synchronisation happens here in one process: the rows of each term are found on the CPU from
the collated masks, before the batch moves to the device (:class:`RowIndex`: ``nonzero`` on a device tensor
waits for the device), and the positive counts take ``num_classes`` (no ``bincount``). With W > 1 the only one
is the packed gather of every rank's row counts (:class:`BatchCounts`), which the variable-sized gather of the
metric rows needs. The terms that are only logged stay on the device as this rank's *shares* (they sum over ranks
to the global value) and are reduced and read once per log step by :class:`TermWindow`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metric_ds import distributed as D
from metric_ds import ops
from metric_ds.data.labels import LABEL_FREE
from metric_ds.ops.reference import positives_per_row

# The order of LossTerms.shares.
SHARE_KEYS = ("ce", "supcon", "with_pos", "pos_sum")


@dataclass
class BatchCounts:
    """Every rank's row counts of one micro-batch: all rows, CE rows, labelled metric rows and label-free rows per
    rank (rank order).

    With W > 1 they come from one packed gather and one read to the host; in one process, from shapes.
    """

    rows: int
    ce_rows: int
    metric_sizes: list[int]
    free_sizes: list[int] = field(default_factory=list)

    @classmethod
    def gather(cls, rows: int, ce_rows: int, metric_rows: int, device: torch.device,
               free_rows: int = 0) -> BatchCounts:
        if D.world_size() == 1:
            return cls(rows, ce_rows, [metric_rows], [free_rows])
        counts = D.all_gather_counts([rows, ce_rows, metric_rows, free_rows], device).tolist()  # the one host sync
        return cls(sum(c[0] for c in counts), sum(c[1] for c in counts), [c[2] for c in counts],
                   [c[3] for c in counts])

    @property
    def metric_rows(self) -> int:
        """Labelled metric rows of every rank (the bank's rows)."""
        return sum(self.metric_sizes)

    @property
    def free_rows(self) -> int:
        """Label-free rows of every rank."""
        return sum(self.free_sizes)

    @property
    def contrast_sizes(self) -> list[int]:
        """Each rank's rows of the contrast set: its labelled metric rows, its label-free rows and their views."""
        frees = self.free_sizes or [0] * len(self.metric_sizes)
        return [m + 2 * f for m, f in zip(self.metric_sizes, frees)]

    @property
    def contrast_rows(self) -> int:
        """The rows of one SupCon evaluation (every rank's, views included)."""
        return sum(self.contrast_sizes)


@dataclass
class RowIndex:
    """The rows of a batch that each loss term takes, in row order: those with ``classifier_mask = 1`` (CE), the
    labelled rows with ``metric_mask = 1`` (SupCon, and the embedding bank) and the label-free rows (SupCon, with
    their second views).

    Found with :meth:`from_masks` on the collated batch while it is still on the CPU, then moved with it
    (:meth:`to`): ``nonzero`` or a boolean-mask index on a device tensor makes the host wait for the device.
    """

    ce: torch.Tensor
    metric: torch.Tensor
    free: torch.Tensor | None = None

    @classmethod
    def from_masks(cls, classifier_mask: torch.Tensor, metric_mask: torch.Tensor,
                   labels: torch.Tensor | None = None) -> RowIndex:
        """The int64 row indices of the masks (a host sync on a GPU: call it on the CPU masks); with ``labels``,
        the metric rows labelled :data:`~metric_ds.data.labels.LABEL_FREE` are the label-free rows."""
        if labels is None:
            return cls(classifier_mask.nonzero().squeeze(1), metric_mask.nonzero().squeeze(1))
        free = labels == LABEL_FREE
        return cls(classifier_mask.nonzero().squeeze(1), (metric_mask & ~free).nonzero().squeeze(1),
                   (metric_mask & free).nonzero().squeeze(1))

    def to(self, device: torch.device) -> RowIndex:
        """The indices on ``device``; to a GPU from pinned memory, without waiting (as the loaders' batches)."""
        if device.type != "cuda":
            return RowIndex(*(None if t is None else t.to(device) for t in (self.ce, self.metric, self.free)))
        return RowIndex(*(None if t is None else t.pin_memory().to(device, non_blocking=True)
                          for t in (self.ce, self.metric, self.free)))

    @property
    def free_count(self) -> int:
        """This batch's label-free rows (a shape: no host sync)."""
        return 0 if self.free is None else self.free.numel()


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


@dataclass
class LossTerms:
    """What one micro-batch's loss gives.

    Attributes:
        backward_loss: what to back-propagate: the loss scaled by :func:`data_parallel_scale`.
        shares: (4,) fp32, this rank's shares of :data:`SHARE_KEYS` (CE, SupCon, metric rows with a positive,
            positives), detached: summed over ranks they give the global values.
        counts: every rank's row counts.
        contrast: the contrast set, detached (the embedding bank takes its rows).
    """

    backward_loss: torch.Tensor
    shares: torch.Tensor
    counts: BatchCounts
    contrast: ContrastSet


@dataclass
class SupConPart:
    """One micro-batch's SupCon: this rank's share of the loss, the anchors with a positive (every rank's, or this
    rank's with local scope), the positive count of each contrast row, and the labelled contrast rows (the bank's)."""

    loss: torch.Tensor
    with_pos: torch.Tensor
    pos_per_row: torch.Tensor
    contrast: ContrastSet


class JointLoss(nn.Module):
    """CE + SupCon.

    Args:
        classification_loss_weight: weight of CE.
        metric_loss_weight: weight of SupCon.
        temperature: SupCon temperature.
        supcon_impl: ``auto|fused|reference`` (see :func:`metric_ds.ops.supcon_loss`).
        supcon_scope: ``global`` (negatives from every rank) or ``local`` (this rank's micro-batch only).
        num_classes: the number of classes, where known: the positive counts then need no host sync. Batches with
            label-free rows need it (their fresh class ids start there).
        label_free_weight: the weight of a label-free anchor relative to a labelled one (see the module).
    """

    def __init__(
        self,
        classification_loss_weight: float = 1.0,
        metric_loss_weight: float = 1.0,
        temperature: float = 0.07,
        supcon_impl: str = "auto",
        supcon_scope: str = "global",
        num_classes: int | None = None,
        label_free_weight: float = 1.0,
    ):
        super().__init__()
        self.ce_weight, self.metric_weight = classification_loss_weight, metric_loss_weight
        self.temperature = temperature
        self.supcon_impl = supcon_impl
        self.supcon_scope = supcon_scope
        self.num_classes = num_classes
        self.label_free_weight = label_free_weight

    def forward(
        self,
        logits: torch.Tensor,
        z: torch.Tensor,
        labels: torch.Tensor,
        classifier_mask: torch.Tensor,
        metric_mask: torch.Tensor,
        rows: RowIndex | None = None,
        z_view: torch.Tensor | None = None,
    ) -> LossTerms:
        """Compute the loss of one micro-batch.

        Args:
            rows: the masks' row indices, found on the CPU (:meth:`RowIndex.from_masks`); ``None``: found here
                from the masks and labels, which waits for the device on a GPU (the training steps pass them).
            z_view: the second view of the label-free rows (``rows.free``, in that order); needed when there are.

        Shape:
            logits: (B, C); z: (B, D) unit norm; labels, classifier_mask, metric_mask: (B,); z_view: (F, D).
        """
        scope, world = self.supcon_scope, D.world_size()
        if rows is None:
            rows = RowIndex.from_masks(classifier_mask, metric_mask, labels)
        ce_idx, m_idx = rows.ce, rows.metric
        counts = BatchCounts.gather(labels.shape[0], ce_idx.numel(), m_idx.numel(), z.device, rows.free_count)

        # CE: the sum over local rows, divided by the global row count.
        ce_part = F.cross_entropy(logits[ce_idx].float(), labels[ce_idx], reduction="sum") / max(counts.ce_rows, 1)

        if counts.free_rows:
            sc = self._label_free_supcon(z, labels, rows, z_view, counts)
        else:
            sc = self._supcon(z, labels, m_idx, counts)
        supcon_part = sc.loss

        ce_scale, supcon_scale = data_parallel_scale(scope)
        backward_loss = ce_scale * self.ce_weight * ce_part + supcon_scale * self.metric_weight * supcon_part

        # Shares for logging. Global scope: every rank holds the same positive counts of the global contrast set,
        # and SupCon is already a share (global denominator). Local scope: counts are local, SupCon a local mean.
        pos_share = world if scope == "global" else 1
        supcon_share = supcon_part.detach().float() / (1 if scope == "global" else world)
        shares = torch.stack([ce_part.detach().float(), supcon_share, sc.with_pos.float() / pos_share,
                              sc.pos_per_row.sum().float() / pos_share])
        return LossTerms(backward_loss, shares, counts, sc.contrast)

    def _supcon(self, z: torch.Tensor, labels: torch.Tensor, m_idx: torch.Tensor, counts: BatchCounts) -> SupConPart:
        """SupCon of labelled rows: this rank's anchors against the contrast set, normalised by the valid anchors of
        all ranks."""
        cs = contrast_set(z[m_idx], labels[m_idx], counts.metric_sizes, self.supcon_scope)
        pos_per_row = positives_per_row(cs.labels, self.num_classes)
        with_pos = (pos_per_row > 0).sum()
        if cs.z.shape[0] > 0:
            supcon_part, _ = ops.supcon_loss(
                cs.z, cs.labels, self.temperature, anchor_start=cs.anchor_start, anchor_count=cs.anchor_count,
                num_valid_global=with_pos, impl=self.supcon_impl, num_classes=self.num_classes,
            )
        else:
            supcon_part = z.sum() * 0.0
        return SupConPart(supcon_part, with_pos, pos_per_row,
                          ContrastSet(cs.z.detach(), cs.labels, cs.anchor_start, cs.anchor_count))

    def _label_free_supcon(self, z: torch.Tensor, labels: torch.Tensor, rows: RowIndex, z_view: torch.Tensor | None,
                           counts: BatchCounts) -> SupConPart:
        """SupCon with label-free rows and their views (see the module): two calls of the op, one per anchor slice
        of this rank's block, over one contrast set and one denominator ``N_l + w N_f``."""
        if self.num_classes is None:
            raise ValueError("JointLoss: a batch with label-free rows needs num_classes (their fresh class ids "
                             "start there); pass the number of labelled classes")
        n_free = rows.free_count
        if n_free and (z_view is None or z_view.shape[0] != n_free):
            raise ValueError(f"JointLoss: {n_free} label-free row(s) need z_view, their second view, with as many "
                             f"rows; got {None if z_view is None else tuple(z_view.shape)}")
        gathered = self.supcon_scope == "global" and D.world_size() > 1
        rank = D.rank() if gathered else 0
        l_sizes = counts.metric_sizes if gathered else [rows.metric.numel()]
        f_sizes = counts.free_sizes if gathered else [n_free]
        sizes = [m + 2 * f for m, f in zip(l_sizes, f_sizes)]
        base = self.num_classes + sum(f_sizes[:rank])
        ids = torch.arange(base, base + n_free, device=labels.device)
        z_f = z[rows.free]
        block_z = torch.cat([z[rows.metric], z_f, z_f[:0] if z_view is None else z_view.to(z_f.dtype)])
        block_y = torch.cat([labels[rows.metric], ids, ids])
        if gathered:
            cz = D.gather_rows(block_z, sizes, with_grad=True)
            cy = D.gather_rows(block_y, sizes, with_grad=False)
        else:
            cz, cy = block_z, block_y
        total_classes = self.num_classes + sum(f_sizes)
        pos_per_row = positives_per_row(cy, total_classes)
        with_pos_l = ((pos_per_row > 0) & (cy < self.num_classes)).sum()
        n_f = 2 * sum(f_sizes)  # every label-free row and every view has its positive
        start, n_l = sum(sizes[:rank]), l_sizes[rank]
        one = torch.ones((), device=z.device)  # the op then gives the sum over its anchors
        parts = []
        for first, count in ((start, n_l), (start + n_l, 2 * n_free)):
            if count:
                part, _ = ops.supcon_loss(cz, cy, self.temperature, anchor_start=first, anchor_count=count,
                                          num_valid_global=one, impl=self.supcon_impl, num_classes=total_classes)
            else:
                part = cz.sum() * 0.0
            parts.append(part)
        w = self.label_free_weight
        denom = (with_pos_l + w * n_f).clamp_min(torch.finfo(torch.float32).tiny)
        loss = (parts[0] + w * parts[1]) / denom
        offsets = [sum(sizes[:r]) for r in range(len(sizes))]
        bank_z = torch.cat([cz[o:o + n] for o, n in zip(offsets, l_sizes)]).detach()
        bank_y = torch.cat([cy[o:o + n] for o, n in zip(offsets, l_sizes)])
        return SupConPart(loss, with_pos_l + n_f, pos_per_row,
                          ContrastSet(bank_z, bank_y, sum(l_sizes[:rank]), n_l))


class TermWindow:
    """Loss terms summed over the micro-batches of a logging window, on the device; reduced over ranks and read
    to the host once, in :meth:`read`.

    Args:
        ce_weight, metric_weight: the loss weights (``total`` is their weighted sum).
    """

    def __init__(self, ce_weight: float, metric_weight: float):
        self.ce_weight, self.metric_weight = ce_weight, metric_weight
        self.reset()

    def reset(self) -> None:
        self.shares: torch.Tensor | None = None
        self.calls = self.micro = self.rows = self.ce_rows = self.metric_rows = self.contrast_rows = 0

    def add(self, terms: LossTerms, micro_batches: int = 1) -> None:
        """Add the terms of one loss evaluation, which covered ``micro_batches`` micro-batches (more than one
        with ``contrastive_batch: accumulated``)."""
        self.shares = terms.shares if self.shares is None else self.shares + terms.shares
        self.calls += 1
        self.micro += micro_batches
        self.rows += terms.counts.rows
        self.ce_rows += terms.counts.ce_rows
        self.metric_rows += terms.counts.metric_rows + terms.counts.free_rows
        self.contrast_rows += terms.counts.contrast_rows

    def read(self) -> dict[str, float]:
        """Means per loss evaluation of the global terms (a collective with W > 1: every rank calls it).
        ``contrastive_batch`` is the rows of one SupCon evaluation: the metric rows, and the second views of the
        label-free ones, which are anchors too."""
        if self.shares is None:
            return {}
        ce, supcon, with_pos, pos_sum = D.all_reduce_sum(self.shares.double()).tolist()
        n, m = self.calls, self.contrast_rows
        return {
            "total": (self.ce_weight * ce + self.metric_weight * supcon) / n,
            "ce": ce / n,
            "supcon": supcon / n,
            "ce_rows": self.ce_rows / n,
            "metric_rows": self.metric_rows / n,
            "contrastive_batch": m / n,
            "anchor_pos_frac": with_pos / m if m else 0.0,
            "mean_pos_per_anchor": pos_sum / m if m else 0.0,
        }
