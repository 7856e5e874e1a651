"""The summary of a pseudo-labelling run: coverage, per-class counts, the cluster purities, the precision estimate
and the settings, as JSON-able data and as a few lines for the terminal."""
from __future__ import annotations

from typing import Any

import numpy as np

from metric_ds.pseudo_label.assign import Assignment
from metric_ds.pseudo_label.settings import Settings


def build_summary(y: np.ndarray, result: Assignment, classes: list, settings: Settings, estimate: dict[str, Any],
                  counts: dict[str, int]) -> dict[str, Any]:
    """The summary of one run.

    Args:
        y: class id per row, -1 for unlabelled, shape (N,).
        result: the pseudo-labels of the unlabelled rows.
        classes: class names by id.
        settings: the settings (recorded as ``thresholds``).
        estimate: the precision estimate (:func:`~metric_ds.pseudo_label.precision.estimate_precision`).
        counts: what the output table holds (:func:`~metric_ds.pseudo_label.table.output_table`).
    """
    lab, pseudo = np.flatnonzero(y >= 0), np.flatnonzero(result.labels >= 0)
    n_unl = int((y < 0).sum())
    summary = {
        "rows": int(len(y)), "labelled": int(len(lab)), "unlabelled": n_unl,
        "pseudo_labelled": int(len(pseudo)), "rejected": n_unl - int(len(pseudo)),
        "coverage": float(len(pseudo) / n_unl) if n_unl else None,
        **counts,
        "per_class": {str(c): {"labelled": int((y[lab] == i).sum()), "pseudo": int((result.labels[pseudo] == i).sum())}
                      for i, c in enumerate(classes)},
        "estimated_precision": estimate,
        "thresholds": settings.thresholds(),
    }
    if settings.method == "kmeans":
        summary["clusters"] = cluster_statistics(result.groups)
    return summary


def cluster_statistics(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """How many clusters, how many hold labelled rows and pass, and the distribution of their purities."""
    purities = np.array([g["purity"] for g in groups if g["support"] > 0])
    quantiles = ({q: float(np.quantile(purities, float(q))) for q in ("0.1", "0.25", "0.5", "0.75", "0.9")}
                 if len(purities) else {})
    return {"k": len(groups), "with_labelled_rows": int(len(purities)),
            "passing": int(sum(g["passes"] for g in groups)),
            "purity_quantiles": quantiles, "purity_histogram": _histogram(purities)}


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
    if summary.get("unassigned_written"):
        lines.append(f"--keep-unassigned: {summary['unassigned_written']} rejected rows kept as label-free rows")
    if summary["left_out_by_metric_mask"]:
        lines.append(f"--metric-mask labelled: {summary['left_out_by_metric_mask']} pseudo-labelled rows left out")
    return "\n".join(lines)
