"""The second view of a batch's label-free rows: the same tokens forwarded again, so dropout draws another mask.

A label-free row (``labels`` = :data:`~metric_ds.data.labels.LABEL_FREE`, ``metric_mask = 1``) is a SupCon class of
its own whose positive is this view (:mod:`metric_ds.losses`). The view's inputs are cut from the collated batch on
the CPU, before it moves (finding the rows on a device tensor would make the host wait), and padded only to the
longest label-free row. The cost is one more forward of those rows only; a batch without them costs nothing.
"""
from __future__ import annotations

from typing import Any

import torch

from metric_ds.data.labels import LABEL_FREE
from metric_ds.model import MODEL_INPUTS

Batch = dict[str, torch.Tensor]


def view_inputs(batch: Batch, device: torch.device) -> Batch | None:
    """The model inputs of the label-free rows of the CPU ``batch`` (in row order), on ``device``; None when the
    batch has none."""
    free = batch["metric_mask"] & (batch["labels"] == LABEL_FREE)
    if not bool(free.any()):
        return None
    idx = free.nonzero().squeeze(1)
    length = int(batch["attention_mask"][idx].sum(1).max())  # rows are padded on the right
    view = {k: batch[k][idx, :length] for k in MODEL_INPUTS if k in batch}
    if device.type == "cuda":  # from pinned memory, without waiting (as the loaders' batches)
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in view.items()}
    return {k: v.to(device) for k, v in view.items()}


def forward_view(engine: Any, view: Batch | None) -> torch.Tensor | None:
    """``z`` of a second forward of the view's rows (in the engine's current mode: train, so dropout is drawn
    afresh), or None without a view."""
    return None if view is None else engine(**view).z
