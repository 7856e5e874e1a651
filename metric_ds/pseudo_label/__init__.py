"""Pseudo-labels for unlabelled rows: embed every row, group the rows, and give an unlabelled row the label of
its group when the group's labelled rows agree enough.

Two methods, both on L2-normalised embeddings, each an
:class:`~metric_ds.pseudo_label.assign.Assigner` (fitted to the embeddings once, then asked to assign):

* ``kmeans`` (default, :mod:`~metric_ds.pseudo_label.kmeans`): k-means with ``k = k_multiple x classes``. A
  cluster's *support* is its number of labelled rows, its *purity* the share of them that carry its majority
  label. An unlabelled row in a cluster with ``support >= min_labelled`` and ``purity >= min_purity`` gets the
  majority label, with the purity as its confidence. The clustering never sees a label.
* ``knn`` (:mod:`~metric_ds.pseudo_label.knn`): label propagation by a vote of each unlabelled row's
  ``neighbours`` nearest labelled rows (cosine). The row gets the top label when the top label's vote share beats
  the runner-up's by at least ``margin``; its confidence is the top share.

The precision estimate (:mod:`~metric_ds.pseudo_label.precision`) needs no gold label. The settings are one
pydantic model (:mod:`~metric_ds.pseudo_label.settings`); the input table is checked in
:mod:`~metric_ds.pseudo_label.labels`, the output table built in :mod:`~metric_ds.pseudo_label.table` and the
summary in :mod:`~metric_ds.pseudo_label.summary`; :func:`pseudo_label_frame` runs them in order. Every function
below the embedding (:mod:`~metric_ds.pseudo_label.embedding`) is a pure function of arrays, so tests can call it
on constructed embeddings.
"""
from metric_ds.pseudo_label.assign import Assigner, Assignment
from metric_ds.pseudo_label.embedding import TextEmbedder, embed_texts, load_embedder
from metric_ds.pseudo_label.kmeans import (
    FULL_KMEANS_MAX_ROWS,
    KMeansAssigner,
    assign_by_clusters,
    cluster_embeddings,
    cluster_purity,
)
from metric_ds.pseudo_label.knn import KnnAssigner, assign_by_knn
from metric_ds.pseudo_label.labels import split_labelled
from metric_ds.pseudo_label.pipeline import ASSIGNERS, pseudo_label_frame
from metric_ds.pseudo_label.precision import estimate_precision, holdout_rows
from metric_ds.pseudo_label.settings import METHODS, Settings
from metric_ds.pseudo_label.summary import build_summary, format_summary
from metric_ds.pseudo_label.table import output_table, repeat_labelled

__all__ = [
    "ASSIGNERS", "FULL_KMEANS_MAX_ROWS", "METHODS", "Assigner", "Assignment",
    "KMeansAssigner", "KnnAssigner", "Settings", "TextEmbedder", "assign_by_clusters", "assign_by_knn",
    "build_summary", "cluster_embeddings", "cluster_purity", "embed_texts", "estimate_precision", "format_summary",
    "holdout_rows", "load_embedder", "output_table", "pseudo_label_frame", "repeat_labelled", "split_labelled",
]
