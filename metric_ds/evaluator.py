"""Validation: run the model over a split and compute classification, loss and retrieval metrics.

The split is sharded over ranks (each rank embeds every W-th batch); the outputs are gathered back in row
order, so every rank computes the same metrics as a single process would. Batches are planned and run as
:mod:`metric_ds.encode` does for one process (``metric-ds evaluate``, ``metric_ds.load``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from metric_ds import distributed as D
from metric_ds import ops
from metric_ds.encode import OUTPUTS, forward_batch, row_batches
from metric_ds.metrics import accuracy, macro_f1, retrieval_metrics

OUTPUT_KEYS = (*OUTPUTS, "labels", "classifier_mask", "metric_mask", "index")


class ShardedBatches:
    """Batch sampler over ``range(n)``, batch ``b`` going to rank ``b % W``.

    With ``lengths`` (tokens per row, the same on every rank) the batches hold rows of similar length, longest
    first, so little time goes into padding; :func:`collect_outputs` puts the rows back in order by ``index``.
    Without, the rows go in order. Every rank yields the same number of batches (an empty list pads the tail)
    so that collective forwards (ZeRO-3) never hang.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 lengths: Sequence[int] | None = None):
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"ShardedBatches: {len(lengths)} lengths for {n} rows")
        self.batches = row_batches(n, batch_size, lengths)
        per_rank = math.ceil(len(self.batches) / world_size) if self.batches else 0
        self.mine = [self.batches[b] if b < len(self.batches) else []
                     for b in range(rank, per_rank * world_size, world_size)]

    def __iter__(self):
        return iter(self.mine)

    def __len__(self) -> int:
        return len(self.mine)


@torch.no_grad()
def collect_outputs(module: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
                    dummy: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Embed every batch; gather the rows of all ranks and return them sorted by row index.

    Args:
        module: a :class:`~metric_ds.model.MetricClassifier` (or the DeepSpeed engine's module).
        batches: collated batches; an empty batch (``index`` of length 0) runs ``dummy`` instead so that
            every rank makes the same number of forward calls.
        device: where the model lives.
        dummy: a 1-row batch for padding.
    """
    was_training = module.training
    module.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in OUTPUT_KEYS}
    for batch in batches:
        empty = batch["index"].numel() == 0
        run = dummy if empty else batch
        out = forward_batch(module, run, device)
        if empty:
            continue
        for key in OUTPUTS:
            parts[key].append(out[key])
        for key in ("labels", "classifier_mask", "metric_mask", "index"):
            parts[key].append(batch[key].to(device))
    module.train(was_training)
    local = {k: torch.cat(v) if v else None for k, v in parts.items()}
    n_local = 0 if local["index"] is None else int(local["index"].numel())
    sizes = D.all_gather_counts([n_local], device)[:, 0].tolist()
    result = {}
    for key in OUTPUT_KEYS:
        value = local[key]
        if value is None:
            like = (0, module.output_dims()[key]) if key in OUTPUTS else (0,)
            dtype = torch.float32 if key in OUTPUTS else (torch.bool if key.endswith("mask") else torch.int64)
            value = torch.zeros(like, dtype=dtype, device=device)
        result[key] = D.gather_rows(value, sizes, with_grad=False)
    order = torch.argsort(result["index"])
    return {k: v[order] for k, v in result.items()}


def supcon_in_batches(z: torch.Tensor, labels: torch.Tensor, temperature: float, batch_size: int,
                      impl: str = "auto") -> float:
    """SupCon over consecutive batches of rows, averaged over all valid anchors (the training loss's view)."""
    total, valid = 0.0, 0
    for start in range(0, z.shape[0], batch_size):
        loss, nv = ops.supcon_loss(z[start:start + batch_size], labels[start:start + batch_size], temperature,
                                   impl=impl)
        total += float(loss) * int(nv)
        valid += int(nv)
    return total / valid if valid else 0.0


def compute_metrics(
    outputs: dict[str, torch.Tensor],
    *,
    ce_weight: float,
    metric_weight: float,
    temperature: float,
    batch_size: int,
    bank: Any = None,
    recall_at_k: Sequence[int],
    knn_k: int,
    distance: str,
    supcon_impl: str = "auto",
) -> dict[str, float]:
    """Metrics of one split (keys without the ``val/`` prefix).

    * ``ce``, ``acc``, ``f1`` on rows with ``classifier_mask``; ``supcon`` on rows with ``metric_mask``
      (in batches of ``batch_size``); ``loss`` = the training loss's weighted total.
    * Retrieval (``recall@K``, ``knn_acc``, ``knn_f1``) with the metric rows as queries against ``bank``
      (skipped when there is no bank or it is empty).
    """
    cm = outputs["classifier_mask"].bool()
    mm = outputs["metric_mask"].bool()
    labels = outputs["labels"]
    metrics: dict[str, float] = {}
    if cm.any():
        logits = outputs["logits"][cm]
        y = labels[cm]
        pred = logits.argmax(dim=1)
        metrics["ce"] = float(torch.nn.functional.cross_entropy(logits, y))
        metrics["acc"] = float(accuracy(y, pred))
        metrics["f1"] = float(macro_f1(y, pred))
    else:
        metrics["ce"] = 0.0
    metrics["supcon"] = supcon_in_batches(outputs["z"][mm], labels[mm], temperature, batch_size, supcon_impl)
    metrics["loss"] = ce_weight * metrics["ce"] + metric_weight * metrics["supcon"]
    if bank is not None and mm.any():
        metrics.update(retrieval_metrics(outputs["z"][mm], outputs["h"][mm], labels[mm], bank,
                                         recall_at_k=list(recall_at_k), knn_k=knn_k, distance=distance))
    return metrics
