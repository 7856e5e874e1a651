"""``metric-ds report RUN_DIR``: PNG plots of a run and one self-contained ``report.html``.

Reads ``RUN_DIR/metrics.jsonl`` (written by the ``jsonl`` logging backend), ``summary.json`` and ``config.yaml``,
and, when ``metric-ds evaluate`` has written one, an evaluation JSON (``RUN_DIR/eval/*.json``,
``RUN_DIR/best/eval/*.json`` or a path given explicitly). Metric names are grouped by their prefix and suffix,
not from a fixed list, so new metrics show up without changes here:

* ``loss.png``: loss terms (``*/loss``, ``*/ce``, ``*/supcon``, ``*_loss``), train solid and validation dashed;
* ``lr.png``: the learning rate (``train/lr``);
* ``val_classifier.png`` and ``val_knn.png``: the other ``val/`` scores (accuracy, F1, ...) and ``val/knn_*``;
* ``val_recall.png``: ``val/recall@K`` over steps, and against K at the last validation;
* ``bank.png``, ``train_diagnostics.png``, ``other.png``: a grid of small panels for ``bank/*``, the remaining
  ``train/*`` (grad norm, throughput, rows, ...) and any other prefix;
* ``per_class_f1_<i>.png`` and ``confusions_<i>.png`` for the i-th evaluation file (0-based, in the order of
  :func:`find_evaluations`): per-class F1 on the evaluated data (sorted) and the 20 most confused label pairs.

``report.html`` embeds every image as a base64 data URI, so the one file can be mailed. Missing pieces (no
validation yet, no summary, no evaluation, a metric logged only in some records) leave their part out.
Matplotlib is an optional extra: ``pip install 'metric-ds[report]'``.

The package: :mod:`~metric_ds.report.records` reads the run, :mod:`~metric_ds.report.plots` draws,
:mod:`~metric_ds.report.html` writes the page, and :func:`build_report` here runs the three.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from metric_ds.errors import UserError
from metric_ds.report.html import render_html
from metric_ds.report.plots import (
    confusions_plot,
    grid_plot,
    line_plot,
    loss_plot,
    per_class_f1_plot,
    pyplot,
    recall_plot,
)
from metric_ds.report.records import (
    Evaluation,
    find_evaluations,
    groups,
    load_evaluation,
    metric_names,
    metrics_table,
    read_records,
    series,
)

__all__ = ["Evaluation", "build_report", "find_evaluations", "load_evaluation", "metric_names", "metrics_table",
           "read_records", "render_html", "series"]

PLOT_FILES = ("loss.png", "lr.png", "val_*.png", "bank.png", "train_diagnostics.png", "other.png",
              "per_class_f1_*.png", "confusions_*.png")


def build_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 evaluation: str | Path | Iterable[str | Path] | None = None) -> Path:
    """Write the plots and ``report.html`` of a run.

    Args:
        run_dir: the run folder (``checkpoints_dir/run_name``) holding ``metrics.jsonl``.
        out_dir: where to write; default ``run_dir/report``.
        evaluation: one or more ``metric-ds evaluate`` JSON files; default: those found by
            :func:`find_evaluations`.

    Returns:
        The path of ``report.html``.

    Raises:
        UserError: no such run folder, no ``metrics.jsonl``, or an unreadable evaluation file.
        EnvironmentProblem: matplotlib is not installed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder; give checkpoints_dir/run_name of a training run")
    records = read_records(run_dir)
    if evaluation is None:
        eval_paths = find_evaluations(run_dir)
    elif isinstance(evaluation, (str, Path)):
        eval_paths = [Path(evaluation)]
    else:
        eval_paths = [Path(p) for p in evaluation]
    evaluations = [load_evaluation(p) for p in eval_paths]
    plt = pyplot()
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for pattern in PLOT_FILES:  # our plots from an earlier report that this one may not redraw
        for old in out.glob(pattern):
            old.unlink()

    g = groups(metric_names(records))
    plots = [
        loss_plot(plt, records, g["loss"], out / "loss.png"),
        line_plot(plt, records, g["lr"], "learning rate", "lr", out / "lr.png"),
        line_plot(plt, records, g["val_classifier"], "validation: classifier head", "score",
                   out / "val_classifier.png"),
        line_plot(plt, records, g["val_knn"], "validation: k-NN against the bank", "score", out / "val_knn.png"),
        recall_plot(plt, records, g["val_recall"], evaluations, out / "val_recall.png"),
        grid_plot(plt, records, g["bank"], "embedding bank statistics", out / "bank.png"),
        grid_plot(plt, records, g["train_diagnostics"], "training diagnostics", out / "train_diagnostics.png"),
        grid_plot(plt, records, g["other"], "other metrics", out / "other.png"),
    ]
    for i, ev in enumerate(evaluations):
        plots.append(per_class_f1_plot(plt, ev, out / f"per_class_f1_{i}.png"))
        plots.append(confusions_plot(plt, ev, out / f"confusions_{i}.png"))
    plots = [p for p in plots if p is not None]
    html_path = out / "report.html"
    html_path.write_text(render_html(run_dir, records, plots, evaluations), encoding="utf-8")
    return html_path
