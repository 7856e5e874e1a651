"""Validation metrics, in torch on the tensors' device: classification, retrieval and embedding geometry.

Classification (rows with ``classifier_mask = 1``):

* :func:`accuracy`; :func:`per_class_f1`; :func:`macro_f1`, equal to ``sklearn.metrics.f1_score(y, p,
  average="macro")``: the mean, over the labels present in ``y`` or ``p``, of
  ``F1 = 2 TP / (2 TP + FP + FN)``. A label present only in ``p`` (or only in ``y``) has F1 = 0 and counts;
  a label in neither does not count.
* :func:`confusion_pairs`: the most frequent (true, predicted) mistakes.

Retrieval (validation rows with ``metric_mask = 1`` are the queries, a database such as the embedding bank):

* :func:`knn_search` scans query chunks x database chunks with a running top-k merge, so all queries x all
  database is never held at once. ``cos``: score = ``z_q . z_b`` (the SupCon embeddings, already
  L2-normalised); ``l2``: score = ``-||h_q - h_b||`` on the raw pooled embeddings. Equal scores go to the
  smaller database index.
* ``recall@K``: share of queries with at least one same-label item among their K nearest (all items when the
  database holds fewer than K).
* ``knn_acc`` / ``knn_f1``: accuracy and macro-F1 of a majority vote of the ``knn_k`` nearest items; a vote
  tie goes to the class with the larger summed score, then to the smaller class id.

Geometry (Wang & Isola 2020, "Understanding contrastive representation learning through alignment and
uniformity on the hypersphere"): :func:`alignment` and :func:`uniformity`, and :func:`embedding_stats`, the health
statistics of a set of labelled embeddings (the embedding bank's ``bank/`` record).

Scores and sums accumulate in fp32 or fp64; bf16 inputs are upcast first.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch

_LOWER_IS_BETTER = re.compile(r"(^|_)(loss|ce|supcon|time|time_s|age)$")


def lower_is_better(name: str) -> bool:
    """Whether smaller is better for a metric name, with or without its prefix (losses, times, ages); every
    other metric (accuracy, F1, recall, ...) is better when larger. The one table of this fact: the best
    checkpoint and the report both read it."""
    return bool(_LOWER_IS_BETTER.search(name.rsplit("/", 1)[-1]))

# ------------------------------------------------------------------------------------------ classification


def accuracy(y: torch.Tensor, p: torch.Tensor) -> float:
    """Share of rows with ``p == y`` (0.0 for no rows)."""
    return float((y == p).double().mean()) if y.numel() else 0.0


def per_class_f1(y: torch.Tensor, p: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """F1 of each class id ``0 .. num_classes - 1``: ``2 TP / (2 TP + FP + FN)``, 0 where that is 0 / 0.

    Args:
        y: (n,) true class ids; p: (n,) predicted class ids.
        num_classes: length of the result; defaults to the largest id in ``y`` or ``p`` plus one.

    Returns:
        (num_classes,) float64 on the device of ``y``.
    """
    y, p = y.long().reshape(-1), p.long().to(y.device).reshape(-1)
    top = int(max(int(y.max()), int(p.max()))) + 1 if y.numel() else 0
    c = top if num_classes is None else int(num_classes)
    if top > c:
        raise ValueError(f"per_class_f1: class id {top - 1} does not fit num_classes={c}")
    tp = torch.bincount(y[y == p], minlength=c).double()
    denom = (torch.bincount(y, minlength=c) + torch.bincount(p, minlength=c)).double()
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))


def macro_f1(y: torch.Tensor, p: torch.Tensor) -> float:
    """Macro-F1 over the labels present in ``y`` or ``p``, as ``sklearn.metrics.f1_score(average="macro")``.

    Returns 0.0 for no rows.
    """
    if y.numel() == 0:
        return 0.0
    y, p = y.long().reshape(-1), p.long().to(y.device).reshape(-1)
    c = int(max(int(y.max()), int(p.max()))) + 1
    present = (torch.bincount(y, minlength=c) + torch.bincount(p, minlength=c)) > 0
    return float(per_class_f1(y, p, c)[present].mean())


def confusion_pairs(y: torch.Tensor, p: torch.Tensor, top: int = 20) -> list[tuple[int, int, int]]:
    """The ``top`` most frequent mistakes as ``(true, predicted, count)``.

    Ordered by count (descending), then true id, then predicted id (ascending).
    """
    y, p = y.long().reshape(-1), p.long().to(y.device).reshape(-1)
    wrong = y != p
    if not bool(wrong.any()):
        return []
    c = int(max(int(y.max()), int(p.max()))) + 1
    # codes come back ascending, i.e. ordered by (true, predicted)
    codes, counts = torch.unique(y[wrong] * c + p[wrong], return_counts=True)
    order = torch.argsort(-counts, stable=True)[:top]
    codes, counts = codes[order].tolist(), counts[order].tolist()
    return [(code // c, code % c, n) for code, n in zip(codes, counts, strict=True)]


# ------------------------------------------------------------------------------------------------ search


def knn_search(queries: torch.Tensor, database: torch.Tensor, k: int, distance: str = "cos",
               query_chunk: int = 1024, db_chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best database items of each query, in chunks (query_chunk x db_chunk scores at a time).

    Each database chunk's scores are appended to the running best and stably sorted by score; since the
    database is scanned in index order, equal scores keep the smaller index first.

    Args:
        queries: the query embeddings.
        database: the database embeddings (moved to the queries' device).
        k: neighbours wanted; capped at the database size.
        distance: ``"cos"`` (score = dot product; pass L2-normalised vectors) or ``"l2"`` (score = minus the
            Euclidean distance).
        query_chunk: queries per chunk.
        db_chunk: database rows per chunk.

    Shape:
        queries: (Q, D); database: (N, D).

    Returns:
        ``(scores, indices)``, each (Q, min(k, N)), best first; scores fp32 (for ``l2``, minus the distance).
    """
    if distance not in ("cos", "l2"):
        raise ValueError(f"distance must be 'cos' or 'l2', got {distance!r}")
    if k < 1 or query_chunk < 1 or db_chunk < 1:
        raise ValueError(f"knn_search needs k, query_chunk and db_chunk >= 1, got {k}, {query_chunk}, "
                         f"{db_chunk}")
    if queries.dim() != 2 or database.dim() != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"knn_search needs queries (Q, D) and database (N, D), got {tuple(queries.shape)} "
                         f"and {tuple(database.shape)}")
    device = queries.device
    db = database.to(device=device, dtype=torch.float32)
    n = db.shape[0]
    k = min(k, n)
    db_sq = db.pow(2).sum(1) if distance == "l2" else None
    out_s, out_i = [torch.zeros(0, k, device=device)], [torch.zeros(0, k, dtype=torch.long, device=device)]
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs:qs + query_chunk].float()
        best_s = torch.zeros(q.shape[0], 0, device=device)
        best_i = torch.zeros(q.shape[0], 0, dtype=torch.long, device=device)
        q_sq = q.pow(2).sum(1, keepdim=True) if distance == "l2" else None
        for ds in range(0, n, db_chunk):
            block = db[ds:ds + db_chunk]
            s = q @ block.T
            if distance == "l2":
                s = -(q_sq + db_sq[ds:ds + db_chunk] - 2 * s).clamp_min(0).sqrt()
            idx = torch.arange(ds, ds + block.shape[0], device=device).expand(q.shape[0], -1)
            cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
            keep = torch.argsort(cand_s, dim=1, descending=True, stable=True)[:, :k]
            best_s, best_i = cand_s.gather(1, keep), cand_i.gather(1, keep)
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)


def recall_at(query_labels: torch.Tensor, neighbour_labels: torch.Tensor,
              ks: Sequence[int]) -> dict[str, float]:
    """``recall@K`` for each K: share of rows with a same-label item among the first K neighbours.

    Shape:
        query_labels: (Q,); neighbour_labels: (Q, k), best first (fewer than K columns: all of them count).
    """
    hits = neighbour_labels == query_labels[:, None]
    return {f"recall@{k}": float(hits[:, :k].any(1).double().mean()) for k in ks}


def knn_vote(neighbour_labels: torch.Tensor, neighbour_scores: torch.Tensor) -> torch.Tensor:
    """Majority vote of each row's neighbours; ties to the larger summed score, then the smaller class id.

    Votes and summed scores (fp64) are computed per neighbour by comparing the row's labels with each other
    (a (Q, k, k) mask), which is deterministic and needs no (Q, num_classes) table.

    Shape:
        neighbour_labels, neighbour_scores: (Q, k) with k >= 1.

    Returns:
        (Q,) predicted class ids.
    """
    same = neighbour_labels[:, :, None] == neighbour_labels[:, None, :]
    votes = same.sum(2)
    sums = (same * neighbour_scores.double()[:, None, :]).sum(2)
    cand = votes == votes.max(1, keepdim=True).values
    sums = torch.where(cand, sums, torch.full_like(sums, float("-inf")))
    cand &= sums == sums.max(1, keepdim=True).values
    big = torch.full_like(neighbour_labels, torch.iinfo(neighbour_labels.dtype).max)
    return torch.where(cand, neighbour_labels, big).min(1).values


_warned_empty = False


def retrieval_metrics(query_z: torch.Tensor, query_h: torch.Tensor, query_labels: torch.Tensor, bank: Any, *,
                      recall_at_k: Sequence[int], knn_k: int, distance: str, query_chunk: int = 1024,
                      bank_chunk: int = 8192) -> dict[str, float]:
    """Recall@K and k-NN accuracy / macro-F1 of the queries against a database, on the database's device.

    Args:
        query_z: normalised SupCon embeddings of the queries (used for ``distance="cos"``).
        query_h: raw pooled embeddings of the queries (used for ``distance="l2"``).
        query_labels: class ids of the queries.
        bank: an :class:`~metric_ds.bank.EmbeddingBank`, or a plain ``(z, h, labels)`` tuple of tensors
            (``metric-ds evaluate``).
        recall_at_k: the K of each ``recall@K``.
        knn_k: neighbours in the vote (fewer when the database is smaller).
        distance: ``"cos"`` or ``"l2"``.
        query_chunk: queries searched at once.
        bank_chunk: database rows scored at once.

    Shape:
        query_z: (Q, Dz); query_h: (Q, Dh); query_labels: (Q,); the tuple: (N, Dz), (N, Dh), (N,).

    Returns:
        ``recall@K`` for each K, ``knn_acc`` and ``knn_f1``; ``{}`` for no queries, and ``{}`` with a warning
        (once per process) for an empty database.
    """
    global _warned_empty
    ks = [int(k) for k in recall_at_k]
    if not ks or min(ks) < 1 or knn_k < 1:
        raise ValueError(f"retrieval_metrics needs positive recall_at_k and knn_k, got "
                         f"{list(recall_at_k)} and {knn_k}")
    if distance not in ("cos", "l2"):
        raise ValueError(f"distance must be 'cos' or 'l2', got {distance!r}")
    db_z, db_h, db_labels = bank if isinstance(bank, tuple) else bank.copy_live_rows()[:3]
    if db_labels.numel() == 0:
        if not _warned_empty:
            warnings.warn("the embedding bank is empty: retrieval metrics are skipped", stacklevel=2)
            _warned_empty = True
        return {}
    if query_labels.numel() == 0:
        return {}
    db = db_z if distance == "cos" else db_h
    q = (query_z if distance == "cos" else query_h).to(db.device)
    scores, idx = knn_search(q, db, max(max(ks), knn_k), distance, query_chunk, bank_chunk)
    labels = db_labels.to(db.device).long()[idx]
    y = query_labels.to(db.device).long()
    out = recall_at(y, labels, ks)
    kk = min(knn_k, labels.shape[1])
    pred = torch.cat([knn_vote(labels[s:s + query_chunk, :kk], scores[s:s + query_chunk, :kk])
                      for s in range(0, labels.shape[0], query_chunk)])
    out["knn_acc"] = accuracy(y, pred)
    out["knn_f1"] = macro_f1(y, pred)
    return out


# ---------------------------------------------------------------------------------------------- geometry


def alignment(z: torch.Tensor, labels: torch.Tensor) -> float:
    """Wang & Isola (2020) alignment, alpha = 2: mean ``||z_i - z_j||^2`` over same-label pairs ``i != j``.

    Pairs are pooled over labels (a label with ``m`` rows gives ``m (m - 1)`` ordered pairs). Computed in
    O(n d) from per-label sums: ``sum_{i, j in c} ||z_i - z_j||^2 = 2 m sum_i ||z_i||^2 - 2 ||sum_i z_i||^2``.

    Shape:
        z: (n, d); labels: (n,).

    Returns:
        The mean (fp64 accumulation), or NaN when no label has two rows.
    """
    if labels.numel() == 0:
        return float("nan")
    zd = z.double()
    _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    m = counts.double()
    sums = torch.zeros(m.shape[0], zd.shape[1], dtype=torch.float64, device=z.device).index_add_(0, inv, zd)
    sq = torch.zeros_like(m).index_add_(0, inv, zd.pow(2).sum(1))
    pairs = float((m * (m - 1)).sum())
    if pairs == 0:
        return float("nan")
    total = (2 * m * sq).sum() - 2 * sums.pow(2).sum()
    return float(total.clamp_min(0) / pairs)


def uniformity(z: torch.Tensor, t: float = 2.0, max_block: int = 1 << 22) -> float:
    """Wang & Isola (2020) uniformity: ``log`` of the mean over pairs ``i != j`` of
    ``exp(-t ||z_i - z_j||^2)``.

    Row blocks of at most ``max_block`` pairwise entries are scored at a time (fp32 distances, fp64 sum).

    Shape:
        z: (n, d).

    Returns:
        The statistic, or NaN for fewer than two rows.
    """
    n = z.shape[0]
    if n < 2:
        return float("nan")
    zf = z.float()
    sq = zf.pow(2).sum(1)
    rows = max(1, max_block // n)
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    for s in range(0, n, rows):
        block = zf[s:s + rows]
        d2 = (sq[s:s + rows, None] + sq[None, :] - 2 * block @ zf.T).clamp_min(0)
        e = torch.exp(-t * d2).double()
        b = block.shape[0]
        e[torch.arange(b, device=z.device), torch.arange(s, s + b, device=z.device)] = 0.0  # drop i == j
        total += e.sum()
    return float(torch.log(total / (n * (n - 1))))


@torch.no_grad()
def embedding_stats(z: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    ages: torch.Tensor | None = None) -> dict[str, float]:
    """Health statistics of labelled embeddings, in O(n d) memory.

    * ``size``: rows ``n``; ``classes_covered``: classes with at least one row, of ``classes_total``.
    * ``class_count_min`` / ``_median`` / ``_max``: rows per covered class (the median of an even number
      of classes is the mean of the two middle counts, as ``numpy.median``).
    * ``mean_age``: mean of ``ages`` (only when given).
    * ``h_norm_mean`` / ``h_norm_std``: mean and population standard deviation of ``||h_i||``.
    * ``intra_cos``: mean of ``cos(z_i, z_j)`` over all ordered pairs ``i != j`` of the same class, pooled
      over classes (a class with ``m`` rows weighs ``m (m - 1)``); from per-class sums of unit vectors,
      ``sum_{i != j} u_i.u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2``.
    * ``inter_centroid_cos``: mean cosine over ordered pairs of distinct covered classes of their
      centroids (the mean of each class's normalised ``z``).
    * ``alignment``: :func:`alignment` of ``z`` (same-class pairs as positives).
    * ``uniformity``: :func:`uniformity` of ``z`` (t = 2).

    A statistic with nothing to average (e.g. ``intra_cos`` when no class has two rows) is left out.

    Args:
        z, h: the normalised (SupCon) and the raw pooled embeddings.
        labels: class ids, in ``[0, num_classes)``.
        num_classes: number of classes of the task.
        ages: per row, how many steps ago it was added.

    Shape:
        z: (n, z_dim); h: (n, h_dim); labels: (n,); ages: (n,).
    """
    n = int(labels.numel())
    out: dict[str, float] = {"size": float(n), "classes_total": float(num_classes)}
    if n == 0:
        out["classes_covered"] = 0.0
        return out
    counts = torch.bincount(labels, minlength=num_classes)
    covered = counts[counts > 0].double()
    norms = h.double().norm(dim=1)
    out.update({
        "classes_covered": float((counts > 0).sum()),
        "class_count_min": float(covered.min()),
        "class_count_median": float(covered.quantile(0.5)),
        "class_count_max": float(covered.max()),
    })
    if ages is not None:
        out["mean_age"] = float(ages.double().mean())
    out.update({"h_norm_mean": float(norms.mean()), "h_norm_std": float(norms.std(correction=0))})
    unit = torch.nn.functional.normalize(z.double(), dim=1)
    sums = torch.zeros(num_classes, unit.shape[1], dtype=torch.float64, device=z.device)
    sums.index_add_(0, labels, unit)
    c = counts.double()
    pairs = float((c * (c - 1)).sum())
    if pairs > 0:  # ||sum_i u_i||^2 - sum_i ||u_i||^2 = sum over ordered pairs i != j of u_i.u_j
        out["intra_cos"] = float(((sums * sums).sum() - (unit * unit).sum()) / pairs)
    cent = torch.nn.functional.normalize(sums[counts > 0], dim=1)
    m = cent.shape[0]
    if m > 1:
        total = cent.sum(0)
        out["inter_centroid_cos"] = float((total @ total - (cent * cent).sum()) / (m * (m - 1)))
    align = alignment(z, labels)
    if align == align:  # not NaN
        out["alignment"] = align
    if n > 1:
        out["uniformity"] = uniformity(z)
    return out
