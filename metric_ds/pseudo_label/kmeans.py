"""The ``kmeans`` method: cluster every row (labels unseen), then give an unlabelled row its cluster's majority
label where the cluster has enough labelled rows (``support >= min_labelled``) and they agree enough
(``purity >= min_purity``); the purity is the row's confidence."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metric_ds.pseudo_label.assign import Assignment
from metric_ds.pseudo_label.settings import Settings

# Up to this many rows, full-batch k-means (Lloyd/Elkan); above it, mini-batches (see cluster_embeddings).
FULL_KMEANS_MAX_ROWS = 100_000


def cluster_embeddings(x: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means cluster of each row (scikit-learn).

    Full-batch ``KMeans`` up to ``FULL_KMEANS_MAX_ROWS`` rows; ``MiniBatchKMeans`` above, whose cost per
    iteration does not grow with N, so that a million rows cluster on a CPU without faiss, an extra compiled
    dependency (time and memory: ``benchmarks/bench_cluster.py``, ``benchmarks/results/cluster.csv``). The input
    stays float32 (no float64 copy).

    Args:
        x: embeddings, shape (N, d); L2-normalised rows make Euclidean k-means spherical.
        n_clusters: k (at most N).
        seed: k-means++ initialisation and mini-batch order.

    Returns:
        int64 cluster ids, shape (N,).
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.ascontiguousarray(x, dtype=np.float32)
    n_clusters = min(n_clusters, len(x))
    if len(x) <= FULL_KMEANS_MAX_ROWS:
        km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters=n_clusters, batch_size=8192, n_init=1, max_no_improvement=20,
                             random_state=seed)
    return km.fit_predict(x).astype(np.int64)


def cluster_purity(clusters: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Support, purity and majority class of each cluster from its labelled rows.

    Args:
        clusters: cluster id per row, shape (N,), values 0..K-1.
        y: class id per row, -1 for unlabelled, shape (N,).
        num_classes: C.

    Returns:
        ``(support, purity, majority)``, each shape (K,); purity 0 and majority -1 where support is 0.
        Ties go to the smaller class id.
    """
    k = int(clusters.max()) + 1 if len(clusters) else 0
    lab = y >= 0
    counts = np.zeros((k, num_classes), dtype=np.int64)
    np.add.at(counts, (clusters[lab], y[lab]), 1)
    support = counts.sum(1)
    majority = np.where(support > 0, counts.argmax(1), -1)
    purity = np.divide(counts.max(1, initial=0), support, out=np.zeros(k), where=support > 0)
    return support, purity, majority


def assign_by_clusters(clusters: np.ndarray, y: np.ndarray, num_classes: int, min_purity: float,
                       min_labelled: int) -> Assignment:
    """Give each unlabelled row (``y == -1``) its cluster's majority label where the cluster passes both
    thresholds (``support >= min_labelled`` and ``purity >= min_purity``)."""
    support, purity, majority = cluster_purity(clusters, y, num_classes)
    passes = (support >= max(min_labelled, 1)) & (purity >= min_purity)
    take = (y < 0) & passes[clusters]
    labels = np.where(take, majority[clusters], -1)
    confidence = np.where(take, purity[clusters], np.nan)
    groups = [{"support": int(s), "purity": float(p), "majority": int(m), "passes": bool(ok)}
              for s, p, m, ok in zip(support, purity, majority, passes)]
    return Assignment(labels, confidence, groups)


@dataclass
class KMeansAssigner:
    """:func:`assign_by_clusters` behind the :class:`~metric_ds.pseudo_label.assign.Assigner` interface: the
    clusters are computed once, in :meth:`fit`."""

    clusters: np.ndarray
    num_classes: int
    min_purity: float
    min_labelled: int

    @classmethod
    def fit(cls, x: np.ndarray, num_classes: int, settings: Settings) -> KMeansAssigner:
        """Cluster ``x`` into ``settings.k_multiple x num_classes`` clusters."""
        clusters = cluster_embeddings(x, settings.k_multiple * num_classes, settings.seed)
        return cls(clusters, num_classes, settings.min_purity, settings.min_labelled)

    def assign(self, y: np.ndarray) -> Assignment:
        return assign_by_clusters(self.clusters, y, self.num_classes, self.min_purity, self.min_labelled)
