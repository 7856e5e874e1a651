"""Pseudo-labels for unlabelled rows: embed every row, group the rows, and give an unlabelled row the label of
its group when the group's labelled rows agree enough.

Two methods, both on L2-normalised embeddings:

* ``kmeans`` (default): k-means with ``k = k_multiple x classes``. A cluster's *support* is its number of
  labelled rows, its *purity* the share of them that carry its majority label. An unlabelled row in a cluster
  with ``support >= min_labelled`` and ``purity >= min_purity`` gets the majority label, with the purity as its
  confidence. The clustering never sees a label.
* ``knn``: label propagation by a vote of each unlabelled row's ``neighbours`` nearest labelled rows (cosine).
  The row gets the top label when the top label's vote share beats the runner-up's by at least ``margin``;
  its confidence is the top share.

The precision estimate needs no gold label: a stratified share of the labelled rows is treated as unlabelled
(the clustering stays as it is; only the labels are hidden), pseudo-labelled from the remaining labelled rows,
and scored against its own labels. The final assignment uses every labelled row. With an embedding that never saw
the labels (round 1) it is within a few points (fewer labelled rows vote; on BANKING77's three draws it was 7 and
5 points low and 1 point high); with a model trained on the labelled rows (round 2, ``--model RUN/best``) it is
optimistic (6 to 15 points high on three draws), and the summary says so. It assumes the labelled rows are a
random draw of the data.

Every function below the embedding is a pure function of arrays, so tests can call it on constructed
embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metric_ds.errors import UserError, format_rows

METHODS = ("kmeans", "knn")
METRIC_MASK_POLICIES = ("all", "labelled")
# Up to this many rows, full-batch k-means (Lloyd/Elkan); above it, mini-batches (see cluster_embeddings).
FULL_KMEANS_MAX_ROWS = 100_000


# ----------------------------------------------------------------------------------------------- embedding

class TextEmbedder:
    """A sentence embedder: the bundled MiniLM (mean pooling + L2 normalisation, as sentence-transformers'
    all-MiniLM-L6-v2 does) or a metric_ds export (its SupCon embedding ``z``).

    Args:
        model: a HF encoder (``kind="encoder"``) or a :class:`metric_ds.model.MetricClassifier` (``"export"``).
        tokenizer: its tokenizer.
        kind: which of the two ``model`` is.
    """

    def __init__(self, model: Any, tokenizer: Any, kind: str):
        self.model, self.tokenizer, self.kind = model, tokenizer, kind

    def __call__(self, input_ids: Any, attention_mask: Any, **extra: Any) -> Any:
        """Unit-norm embeddings, shape (B, dim), float32."""
        import torch.nn.functional as F

        from metric_ds.model import mean_pool

        if self.kind == "export":
            return self.model(input_ids, attention_mask, extra.get("token_type_ids")).z
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return F.normalize(mean_pool(states, attention_mask).float(), dim=-1)


def load_embedder(model: str | Path | None) -> TextEmbedder:
    """The bundled MiniLM (``None``), a metric_ds export (a folder with ``heads.json``, e.g. ``RUN/best``), or
    any local HF encoder folder (mean pooling)."""
    from metric_ds.artifact import HEADS_META, load_model
    from metric_ds.model import load_encoder

    if model is not None and (Path(model) / HEADS_META).is_file():
        net, tok = load_model(model)
        return TextEmbedder(net, tok, "export")
    net, tok = load_encoder(None if model is None else str(model))
    return TextEmbedder(net.eval(), tok, "encoder")


def embed_texts(model: TextEmbedder, texts: list[str], batch_size: int = 128, max_seq_length: int = 128,
                device: Any = None) -> np.ndarray:
    """Embed texts with :func:`metric_ds.encode.encode` (length-sorted batches, a progress bar, the GPU when
    there is one for ``device=None``); the output keeps the input order.

    Returns:
        float32 array, shape (N, dim), rows of unit norm.
    """
    import torch

    from metric_ds.encode import encode, pick_device

    device = pick_device(device)
    model.model.to(device).eval()
    out = encode(model, model.tokenizer, texts, max_seq_length, batch_size, device, show_progress=True,
                 desc="embedding")
    return out.get("z", torch.empty(0)).numpy()


# ----------------------------------------------------------------------------------------------- grouping

def cluster_embeddings(x: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means cluster of each row (scikit-learn).

    Full-batch ``KMeans`` up to ``FULL_KMEANS_MAX_ROWS`` rows; ``MiniBatchKMeans`` above, whose cost per
    iteration does not grow with N: 1,000,000 x 384 float32 rows with k = 154 clustered in under 9 minutes
    and 3.7 GiB on a heavily loaded 2-core CPU (``benchmarks/bench_cluster.py``), so faiss, an extra compiled
    dependency, buys nothing at this scale. The input stays float32 (no float64 copy).

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


@dataclass
class Assignment:
    """Pseudo-labels of the unlabelled rows.

    Attributes:
        labels: class id per row (-1: rejected, or a labelled row), shape (N,).
        confidence: purity (kmeans) or top vote share (knn) per row; NaN where rejected.
        groups: per-cluster statistics (kmeans) for the summary: support, purity, majority class.
    """

    labels: np.ndarray
    confidence: np.ndarray
    groups: list[dict[str, Any]] = field(default_factory=list)


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


def assign_by_knn(x: np.ndarray, y: np.ndarray, num_classes: int, neighbours: int, margin: float,
                  chunk: int = 4096) -> Assignment:
    """Each unlabelled row's ``neighbours`` nearest labelled rows (cosine on unit rows) vote; the row takes the
    top label when its vote share beats the runner-up's by at least ``margin`` (ties never pass a margin > 0)."""
    lab = np.flatnonzero(y >= 0)
    unl = np.flatnonzero(y < 0)
    labels = np.full(len(y), -1, dtype=np.int64)
    confidence = np.full(len(y), np.nan)
    k = min(neighbours, len(lab))
    if k == 0 or len(unl) == 0:
        return Assignment(labels, confidence)
    bank = np.ascontiguousarray(x[lab], dtype=np.float32)
    bank_y = y[lab]
    for start in range(0, len(unl), chunk):
        rows = unl[start:start + chunk]
        sims = np.ascontiguousarray(x[rows], dtype=np.float32) @ bank.T
        nn_idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < len(lab) else np.broadcast_to(
            np.arange(len(lab)), (len(rows), len(lab)))
        votes = np.zeros((len(rows), num_classes))
        np.add.at(votes, (np.repeat(np.arange(len(rows)), k), bank_y[nn_idx].ravel()), 1.0 / k)
        order = np.argsort(-votes, axis=1, kind="stable")
        top = votes[np.arange(len(rows)), order[:, 0]]
        second = votes[np.arange(len(rows)), order[:, 1]] if num_classes > 1 else np.zeros(len(rows))
        ok = top - second >= margin - 1e-12
        labels[rows[ok]] = order[ok, 0]
        confidence[rows[ok]] = top[ok]
    return Assignment(labels, confidence)


def holdout_rows(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified share of the labelled rows (``round(fraction x n_c)`` of class c, never its last row).

    Returns:
        Sorted row positions, shape (H,).
    """
    rng = np.random.default_rng(seed)
    out = [np.zeros(0, dtype=np.int64)]
    for cls in np.unique(y[y >= 0]):
        idx = np.flatnonzero(y == cls)
        take = min(int(round(fraction * len(idx))), len(idx) - 1)
        out.append(rng.permutation(idx)[:take])
    return np.sort(np.concatenate(out))


def estimate_precision(assign: Any, y: np.ndarray, fraction: float, seed: int) -> dict[str, Any]:
    """Hide the labels of a held-out share of labelled rows, pseudo-label them with ``assign`` (a function of
    the label vector with -1 for unlabelled, returning an :class:`Assignment`), and score them.

    Returns:
        ``held_out`` rows, ``assigned`` of them, ``coverage`` (assigned / held out) and ``precision``
        (correct / assigned; None when nothing was assigned).
    """
    rows = holdout_rows(y, fraction, seed)
    if len(rows) == 0:
        return {"held_out": 0, "assigned": 0, "coverage": None, "precision": None}
    hidden = y.copy()
    hidden[rows] = -1
    pred = assign(hidden).labels[rows]
    assigned = pred >= 0
    correct = int((pred[assigned] == y[rows][assigned]).sum())
    return {"held_out": int(len(rows)), "assigned": int(assigned.sum()),
            "coverage": float(assigned.mean()),
            "precision": float(correct / assigned.sum()) if assigned.any() else None}


# ----------------------------------------------------------------------------------------------- the table

@dataclass
class Settings:
    """The command's options (see ``metric-ds pseudo-label --help``)."""

    method: str = "kmeans"
    k_multiple: int = 2
    min_purity: float = 0.8
    min_labelled: int = 2
    neighbours: int = 10
    margin: float = 0.3
    metric_mask: str = "all"
    holdout_fraction: float = 0.2
    labelled_share: float | None = None
    seed: int = 0

    def problems(self) -> list[str]:
        """Every bad option, each naming its flag."""
        out = []
        if self.method not in METHODS:
            out.append(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.metric_mask not in METRIC_MASK_POLICIES:
            out.append(f"--metric-mask must be one of {', '.join(METRIC_MASK_POLICIES)}, got {self.metric_mask!r}")
        if self.k_multiple < 1:
            out.append(f"--k-multiple must be >= 1, got {self.k_multiple}")
        if not 0 <= self.min_purity <= 1:
            out.append(f"--min-purity must be in [0, 1], got {self.min_purity}")
        if self.min_labelled < 1:
            out.append(f"--min-labelled must be >= 1, got {self.min_labelled}")
        if self.neighbours < 1:
            out.append(f"--neighbours must be >= 1, got {self.neighbours}")
        if not 0 <= self.margin <= 1:
            out.append(f"--margin must be in [0, 1], got {self.margin}")
        if not 0 <= self.holdout_fraction < 1:
            out.append(f"--holdout-fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.labelled_share is not None and not 0 < self.labelled_share < 1:
            out.append(f"--labelled-share must be in (0, 1), got {self.labelled_share}")
        return out


def repeat_labelled(table: pd.DataFrame, share: float) -> tuple[pd.DataFrame, int]:
    """Repeat the labelled rows (``classifier_mask = 1``) r times so that they make up about ``share`` of the
    table: every random batch then holds labelled rows and the classifier gets enough updates, while SupCon
    still sees every pseudo-labelled row once per epoch.

    Returns:
        ``(table, r)``: the labelled rows r times (r >= 1), then the other rows.
    """
    lab = table[table["classifier_mask"] == 1]
    rest = table[table["classifier_mask"] != 1]
    r = max(1, round(share * len(rest) / ((1 - share) * len(lab)))) if len(lab) else 1
    return pd.concat([lab] * r + [rest], ignore_index=True), r


def split_labelled(df: pd.DataFrame, source: str, settings: Settings) -> tuple[np.ndarray, list]:
    """Check the input table and encode its labels.

    A row whose ``label`` is null or empty (whitespace only) is unlabelled. Refused: missing columns, bad text,
    no labelled row, no unlabelled row, labels of mixed types, and (kmeans) a class with fewer labelled rows
    than ``min_labelled``, which no cluster could ever give to a row.

    Returns:
        ``(y, classes)``: class id per row (-1 unlabelled), and the classes in sorted order.

    Raises:
        UserError: every problem at once, naming the file, the column, the rows and the fix.
    """
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)}; the table has "
                        f"{', '.join(map(str, df.columns))}. pseudo-label needs text and label (empty for "
                        "unlabelled rows)")
    problems = []
    bad_text = [i for i, t in enumerate(df["text"].tolist()) if not isinstance(t, str) or not t.strip()]
    if bad_text:
        problems.append(f"{source}: column text: null, empty or non-text values in {format_rows(bad_text)}; "
                        "remove those rows or fill in the text")
    raw = df["label"].tolist()
    labelled = np.array([not (v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))
                              or (isinstance(v, str) and not v.strip())) for v in raw])
    values = [int(v) if isinstance(v, (float, np.floating)) and float(v).is_integer() else
              (v.item() if isinstance(v, np.generic) else v) for v, ok in zip(raw, labelled) if ok]
    kinds = {type(v).__name__ for v in values}
    if not labelled.any():
        problems.append(f"{source}: no labelled row (every label is null or empty); label a few rows of each "
                        "class by hand")
    if labelled.all():
        problems.append(f"{source}: no unlabelled row; leave the label of the rows to pseudo-label empty "
                        "(or train on this table directly)")
    if len(kinds) > 1:
        problems.append(f"{source}: column label: labels of mixed types ({', '.join(sorted(kinds))}); use one type")
    if problems:
        raise UserError(problems)
    classes = sorted(set(values))
    ids = {c: i for i, c in enumerate(classes)}
    y = np.full(len(df), -1, dtype=np.int64)
    y[labelled] = [ids[v] for v in values]
    if settings.method == "kmeans":
        counts = np.bincount(y[labelled], minlength=len(classes))
        few = [str(classes[i]) for i in np.flatnonzero(counts < settings.min_labelled)]
        if few:
            raise UserError(f"{source}: class(es) with fewer than --min-labelled = {settings.min_labelled} labelled "
                            f"row(s): {', '.join(few[:10])}{' ...' if len(few) > 10 else ''}; no cluster could "
                            "give them a pseudo-label. Label more rows of those classes, or lower --min-labelled")
    return y, classes


def pseudo_label_frame(df: pd.DataFrame, x: np.ndarray, y: np.ndarray, classes: list,
                       settings: Settings) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Pseudo-label the rows of ``df`` from their embeddings ``x`` and labels ``y`` (-1 unlabelled).

    Returns:
        ``(table, summary)``: the training table (``text``, ``label``, ``metric_mask``, ``classifier_mask``,
        ``source``, ``confidence``; labelled rows first, ``settings.labelled_share`` repeating them (see
        :func:`repeat_labelled`), then pseudo-labelled rows, each in input order) and the
        summary (coverage, per-class counts, purity distribution, precision estimate, thresholds).
    """
    num_classes = len(classes)
    if settings.method == "kmeans":
        clusters = cluster_embeddings(x, settings.k_multiple * num_classes, settings.seed)

        def assign(labels: np.ndarray) -> Assignment:
            return assign_by_clusters(clusters, labels, num_classes, settings.min_purity, settings.min_labelled)
    else:
        def assign(labels: np.ndarray) -> Assignment:
            return assign_by_knn(x, labels, num_classes, settings.neighbours, settings.margin)

    result = assign(y)
    estimate = estimate_precision(assign, y, settings.holdout_fraction, settings.seed)
    lab, pseudo = np.flatnonzero(y >= 0), np.flatnonzero(result.labels >= 0)
    n_unl = int((y < 0).sum())
    names = np.array(classes, dtype=object)
    parts = [pd.DataFrame({"text": df["text"].to_numpy()[lab], "label": names[y[lab]],
                           "metric_mask": 1, "classifier_mask": 1, "source": "labelled", "confidence": 1.0})]
    if settings.metric_mask == "labelled":
        # as in `prepare --metric-mask labelled`: SupCon on the labelled rows only, so a pseudo-labelled row
        # would take part in neither loss and is left out
        rejected_policy, pseudo_written = len(pseudo), 0
    else:
        parts.append(pd.DataFrame({"text": df["text"].to_numpy()[pseudo], "label": names[result.labels[pseudo]],
                                   "metric_mask": 1, "classifier_mask": 0, "source": "pseudo",
                                   "confidence": result.confidence[pseudo]}))
        rejected_policy, pseudo_written = 0, len(pseudo)
    table = pd.concat(parts, ignore_index=True)
    repeat = 1
    if settings.labelled_share is not None:
        table, repeat = repeat_labelled(table, settings.labelled_share)
    if all(isinstance(c, int) for c in classes):
        table["label"] = table["label"].astype("int64")
    purities = np.array([g["purity"] for g in result.groups if g["support"] > 0])
    summary = {
        "rows": int(len(df)), "labelled": int(len(lab)), "unlabelled": n_unl,
        "pseudo_labelled": int(len(pseudo)), "rejected": n_unl - int(len(pseudo)),
        "coverage": float(len(pseudo) / n_unl) if n_unl else None,
        "written": int(len(table)), "pseudo_written": pseudo_written, "labelled_repeat": repeat, "left_out_by_metric_mask": rejected_policy,
        "per_class": {str(c): {"labelled": int((y[lab] == i).sum()), "pseudo": int((result.labels[pseudo] == i).sum())}
                      for i, c in enumerate(classes)},
        "estimated_precision": estimate,
        "thresholds": dict(vars(settings)),
    }
    if settings.method == "kmeans":
        summary["clusters"] = {
            "k": len(result.groups), "with_labelled_rows": int(len(purities)),
            "passing": int(sum(g["passes"] for g in result.groups)),
            "purity_quantiles": ({q: float(np.quantile(purities, float(q))) for q in ("0.1", "0.25", "0.5", "0.75", "0.9")}
                                 if len(purities) else {}),
            "purity_histogram": _histogram(purities),
        }
    return table, summary


def _histogram(values: np.ndarray) -> dict[str, int]:
    """Counts in ten bins of width 0.1 over [0, 1] (the last bin holds 1.0)."""
    counts, edges = np.histogram(values, bins=10, range=(0.0, 1.0))
    return {f"{lo:.1f}-{hi:.1f}": int(c) for c, lo, hi in zip(counts, edges[:-1], edges[1:])}


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    est = summary["estimated_precision"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"rows {summary['rows']}: labelled {summary['labelled']}, unlabelled {summary['unlabelled']}",
             f"pseudo-labelled {summary['pseudo_labelled']} (coverage {pct(summary['coverage'])}), "
             f"rejected {summary['rejected']}",
             f"estimated precision {pct(est['precision'])} (held out {est['held_out']} labelled rows, "
             f"{est['assigned']} of them assigned, coverage {pct(est['coverage'])})"
             + (f"; {est['caveat']}" if est.get("caveat") else "")]
    if "clusters" in summary:
        c = summary["clusters"]
        med = c["purity_quantiles"].get("0.5")
        lines.append(f"clusters: {c['k']}, {c['with_labelled_rows']} with labelled rows, {c['passing']} passing; "
                     f"median purity {pct(med)}")
    if summary["left_out_by_metric_mask"]:
        lines.append(f"--metric-mask labelled: {summary['left_out_by_metric_mask']} pseudo-labelled rows left out")
    return "\n".join(lines)
