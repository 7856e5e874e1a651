"""Validation metrics, in torch (on the bank's device): classification and retrieval.

* :func:`macro_f1` equals ``sklearn.metrics.f1_score(y, p, average="macro")``: the mean F1 over the labels present
  in ``y`` or ``p``; a label with no true and no predicted rows does not count.
* Retrieval searches a database (the bank) for each query's nearest items in query chunks x database chunks with
  a running top-k merge, so all-queries x all-database is never materialised. ``cos``: similarity of the
  normalised SupCon embeddings ``z``; ``l2``: Euclidean distance of the raw pooled ``h`` (score = -distance).
  Ties in score go to the smaller database index.
* ``recall@K``: share of queries with at least one same-label item among their K nearest.
* ``knn_acc`` / ``knn_f1``: majority vote of the ``knn_k`` nearest; vote ties go to the larger summed score,
  then to the smaller class id.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch


def accuracy(y: torch.Tensor, p: torch.Tensor) -> float:
    return float((y == p).float().mean()) if y.numel() else 0.0


def per_class_f1(y: torch.Tensor, p: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """F1 of each class id ``0..C-1`` (0 where a class has no true and no predicted rows)."""
    c = int(num_classes if num_classes is not None else max(int(y.max()), int(p.max())) + 1)
    y, p = y.long().cpu(), p.long().cpu()
    tp = torch.bincount(y[y == p], minlength=c).double()
    true = torch.bincount(y, minlength=c).double()
    pred = torch.bincount(p, minlength=c).double()
    denom = true + pred
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))


def macro_f1(y: torch.Tensor, p: torch.Tensor) -> float:
    """Macro-F1 over the labels present in ``y`` or ``p`` (as sklearn)."""
    if y.numel() == 0:
        return 0.0
    c = int(max(int(y.max()), int(p.max()))) + 1
    f1 = per_class_f1(y, p, c)
    present = (torch.bincount(y.long().cpu(), minlength=c) + torch.bincount(p.long().cpu(), minlength=c)) > 0
    return float(f1[present].mean())


def confusion_pairs(y: torch.Tensor, p: torch.Tensor, top: int = 20) -> list[tuple[int, int, int]]:
    """The ``top`` most frequent (true, predicted) pairs with true != predicted, by count then ids."""
    wrong = y != p
    if not wrong.any():
        return []
    pairs = torch.stack([y[wrong], p[wrong]], 1).cpu()
    uniq, counts = torch.unique(pairs, dim=0, return_counts=True)
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), int(uniq[i, 0]), int(uniq[i, 1])))
    return [(int(uniq[i, 0]), int(uniq[i, 1]), int(counts[i])) for i in order[:top]]


def knn_search(queries: torch.Tensor, database: torch.Tensor, k: int, distance: str = "cos",
               query_chunk: int = 1024, db_chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k database items per query.

    Args:
        queries: (Q, D); database: (N, D).
        k: neighbours (capped at N).
        distance: ``cos`` (dot product of normalised vectors) or ``l2`` (score = -Euclidean distance).

    Returns:
        ``(scores, indices)``, each (Q, min(k, N)), best first; equal scores ordered by smaller index.
    """
    if distance not in ("cos", "l2"):
        raise ValueError(f"distance must be 'cos' or 'l2', got {distance!r}")
    q_all, db = queries.float(), database.float().to(queries.device)
    n = db.shape[0]
    k = min(k, n)
    out_s, out_i = [], []
    db_sq = db.pow(2).sum(1) if distance == "l2" else None
    for qs in range(0, q_all.shape[0], query_chunk):
        q = q_all[qs:qs + query_chunk]
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        q_sq = q.pow(2).sum(1, keepdim=True) if distance == "l2" else None
        for ds in range(0, n, db_chunk):
            block = db[ds:ds + db_chunk]
            s = q @ block.T
            if distance == "l2":
                s = -(q_sq + db_sq[ds:ds + db_chunk][None, :] - 2 * s).clamp_min(0).sqrt()
            idx = torch.arange(ds, ds + block.shape[0], device=q.device).expand(q.shape[0], -1)
            cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
            # stable order: by score desc, then index asc (sort by index first, then a stable sort by score)
            by_idx = torch.argsort(cand_i, dim=1, stable=True)
            cand_s, cand_i = cand_s.gather(1, by_idx), cand_i.gather(1, by_idx)
            by_score = torch.argsort(-cand_s, dim=1, stable=True)[:, :k]
            best_s, best_i = cand_s.gather(1, by_score), cand_i.gather(1, by_score)
        out_s.append(best_s)
        out_i.append(best_i)
    if not out_s:
        return torch.zeros((0, k)), torch.zeros((0, k), dtype=torch.long)
    return torch.cat(out_s), torch.cat(out_i)


def recall_from_neighbours(query_labels: torch.Tensor, neighbour_labels: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """``recall@K`` for each K from a (Q, >=max K) matrix of neighbour labels, best first."""
    hits = neighbour_labels == query_labels[:, None]
    return {f"recall@{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}


def knn_vote(neighbour_labels: torch.Tensor, neighbour_scores: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote per row; ties to the larger summed score, then the smaller class id."""
    q = neighbour_labels.shape[0]
    votes = torch.zeros(q, num_classes, dtype=torch.float64, device=neighbour_labels.device)
    votes.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_scores, dtype=torch.float64))
    sums = torch.zeros_like(votes)
    sums.scatter_add_(1, neighbour_labels, neighbour_scores.double())
    best_votes = votes.max(1, keepdim=True).values
    tied = votes == best_votes
    sums = torch.where(tied, sums, torch.full_like(sums, float("-inf")))
    best_sum = sums.max(1, keepdim=True).values
    winners = tied & (sums == best_sum)
    # smallest class id among the winners
    ids = torch.arange(num_classes, device=votes.device).expand(q, -1)
    return torch.where(winners, ids, torch.full_like(ids, num_classes)).min(1).values


_warned_empty = False


def retrieval_metrics(query_z: torch.Tensor, query_h: torch.Tensor, query_labels: torch.Tensor, bank: Any,
                      recall_at_k: list[int] = (1, 5, 10), knn_k: int = 10, distance: str = "cos",
                      query_chunk: int = 1024, bank_chunk: int = 8192) -> dict[str, float]:
    """Recall@K and k-NN accuracy/macro-F1 of queries against a bank.

    Args:
        query_z, query_h: (Q, Dz) normalised SupCon embeddings and (Q, Dh) raw pooled embeddings.
        query_labels: (Q,).
        bank: an :class:`~metric_ds.bank.EmbeddingBank`, or a ``(z, h, labels)`` tuple of tensors.

    Returns:
        ``recall@K`` for each K, ``knn_acc`` and ``knn_f1``; ``{}`` (with one warning) for an empty bank.
    """
    global _warned_empty
    if isinstance(bank, tuple):
        db_z, db_h, db_labels = bank
    else:
        db_z, db_h, db_labels, _ = bank.view()
    if db_labels.numel() == 0:
        if not _warned_empty:
            warnings.warn("the embedding bank is empty: retrieval metrics are skipped", stacklevel=2)
            _warned_empty = True
        return {}
    q = query_z if distance == "cos" else query_h
    db = db_z if distance == "cos" else db_h
    k = max(max(recall_at_k), knn_k)
    scores, idx = knn_search(q.to(db.device), db, k, distance, query_chunk, bank_chunk)
    labels = db_labels.to(idx.device)[idx]
    y = query_labels.to(idx.device)
    out = recall_from_neighbours(y, labels, list(recall_at_k))
    kk = min(knn_k, labels.shape[1])
    num_classes = int(max(int(db_labels.max()), int(y.max()))) + 1
    pred = knn_vote(labels[:, :kk], scores[:, :kk], num_classes)
    out["knn_acc"] = accuracy(y, pred)
    out["knn_f1"] = macro_f1(y, pred)
    return out


def alignment(z: torch.Tensor, labels: torch.Tensor) -> float:
    """Wang & Isola (2020) alignment: mean ||z_i - z_j||^2 over same-label pairs i != j (alpha = 2).

    With unit vectors ||z_i - z_j||^2 = 2 - 2 z_i.z_j, so the sum over pairs comes from per-class sums in O(N d).
    """
    total, pairs = 0.0, 0
    for cls in torch.unique(labels):
        zc = z[labels == cls].double()
        n = zc.shape[0]
        if n < 2:
            continue
        s = zc.sum(0)
        dot_sum = float(s @ s - zc.pow(2).sum())  # sum over ordered pairs i != j of z_i.z_j
        sq = zc.pow(2).sum(1)
        total += float(2 * (n - 1) * sq.sum()) - 2 * dot_sum
        pairs += n * (n - 1)
    return total / pairs if pairs else float("nan")


def uniformity(z: torch.Tensor, t: float = 2.0, chunk: int = 4096) -> float:
    """Wang & Isola (2020) uniformity: log mean over pairs i != j of exp(-t ||z_i - z_j||^2), chunked."""
    n = z.shape[0]
    if n < 2:
        return float("nan")
    zf = z.float()
    sq = zf.pow(2).sum(1)
    total = 0.0
    for s in range(0, n, chunk):
        block = zf[s:s + chunk]
        d2 = (sq[s:s + chunk, None] + sq[None, :] - 2 * block @ zf.T).clamp_min(0)
        e = torch.exp(-t * d2.double())
        rows = torch.arange(s, s + block.shape[0], device=z.device)
        e[torch.arange(block.shape[0], device=z.device), rows] = 0.0
        total += float(e.sum())
    return float(torch.log(torch.tensor(total / (n * (n - 1)))))
