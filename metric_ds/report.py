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
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metric_ds.errors import EnvironmentProblem, UserError
from metric_ds.metrics import lower_is_better

_LOSS_SUFFIX = re.compile(r"^(loss|ce|supcon|.*_loss)$")
_RECALL = re.compile(r"^val/recall@(\d+)$")
_DPI = 110
_PLOT_FILES = ("loss.png", "lr.png", "val_*.png", "bank.png", "train_diagnostics.png", "other.png",
               "per_class_f1_*.png", "confusions_*.png")


@dataclass
class Evaluation:
    """One ``metric-ds evaluate`` result file."""

    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        """A short label for titles: the evaluated table's stem (``test``), else the JSON's stem."""
        return Path(str(self.data.get("data") or self.path.stem)).stem or "eval"


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EnvironmentProblem("metric-ds report needs matplotlib: pip install matplotlib "
                                 "(or pip install 'metric-ds[report]')") from None
    return plt


# ----------------------------------------------------------------------------------------------- reading


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``; unreadable lines (a line cut short by a crash) are skipped.

    Raises:
        UserError: the folder has no ``metrics.jsonl``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl here; give the run folder (checkpoints_dir/run_name) of a "
                        "run logged with the 'jsonl' backend (logging.backends)")
    records, bad = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(i)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            bad.append(i)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) (first: line {bad[0]})", stacklevel=2)
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one metric, sorted by step.

    Records without the metric (or with ``null``/non-numbers) are skipped. When a step appears more than once
    (a run resumed from an earlier checkpoint replays steps), the later record wins.
    """
    by_step: dict[int, float] = {}
    for r in records:
        value = _number(r.get(key))
        if value is not None:
            by_step[int(r["step"])] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def metric_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every metric name with at least one numeric value, in first-seen order (``step``/``epoch`` excluded)."""
    names: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in ("step", "epoch") and _number(v) is not None:
                names.setdefault(k, None)
    return list(names)


def find_evaluations(run_dir: str | Path) -> list[Path]:
    """Evaluation JSONs of a run: ``RUN_DIR/eval/*.json`` and ``RUN_DIR/best/eval/*.json``."""
    run_dir = Path(run_dir)
    return sorted([*run_dir.glob("eval/*.json"), *run_dir.glob("best/eval/*.json")])


def load_evaluation(path: str | Path) -> Evaluation:
    """Read one ``metric-ds evaluate`` JSON.

    Raises:
        UserError: the file is missing or is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such evaluation file; write one with `metric-ds evaluate`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); write it again with `metric-ds evaluate`") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object as written by `metric-ds evaluate`")
    return Evaluation(path, data)


def metrics_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric: the final value and step, and for ``val/`` metrics the best value and its step.

    Returns:
        One dict per metric with ``name``, ``final``, ``final_step``, ``best``, ``best_step`` (``None`` where
        "best" does not apply) and ``points``.
    """
    rows = []
    for name in metric_names(records):
        steps, values = series(records, name)
        row = {"name": name, "final": values[-1], "final_step": steps[-1], "best": None, "best_step": None,
               "points": len(values)}
        if name.startswith("val/"):
            pick = min if lower_is_better(name) else max
            i = pick(range(len(values)), key=values.__getitem__)
            row["best"], row["best_step"] = values[i], steps[i]
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------- grouping


def _suffix(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _groups(names: list[str]) -> dict[str, list[str]]:
    """Metric names per plot."""
    groups: dict[str, list[str]] = {k: [] for k in ("loss", "lr", "val_classifier", "val_knn", "val_recall",
                                                    "bank", "train_diagnostics", "other")}
    for name in names:
        prefix = name.split("/", 1)[0] if "/" in name else ""
        suffix = _suffix(name)
        if prefix in ("train", "val") and _LOSS_SUFFIX.match(suffix):
            groups["loss"].append(name)
        elif prefix == "train" and suffix == "lr":
            groups["lr"].append(name)
        elif prefix == "train":
            groups["train_diagnostics"].append(name)
        elif _RECALL.match(name):
            groups["val_recall"].append(name)
        elif prefix == "val" and suffix.startswith("knn"):
            groups["val_knn"].append(name)
        elif prefix == "val":
            groups["val_classifier"].append(name)
        elif prefix == "bank":
            groups["bank"].append(name)
        else:
            groups["other"].append(name)
    groups["val_recall"].sort(key=lambda n: int(_RECALL.match(n).group(1)))
    return groups


# ---------------------------------------------------------------------------------------------- plotting


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _style_axes(ax, title: str, ylabel: str | None = None) -> None:
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _plot_series(ax, records, key: str, label: str | None = None, **kw) -> None:
    x, y = series(records, key)
    if len(x) <= 30:
        kw.setdefault("marker", "o")
        kw.setdefault("markersize", 3)
    ax.plot(x, y, label=label or key, **kw)


def _loss_plot(plt, records, keys: list[str], path: Path) -> Path | None:
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    terms = list(dict.fromkeys(_suffix(k) for k in keys))
    smoothed = False
    for key in keys:
        split, term = key.split("/", 1)
        color = colors[terms.index(term) % len(colors)]
        if split == "val":
            _plot_series(ax, records, key, color=color, linestyle="--", marker="o", markersize=4)
            continue
        x, y = series(records, key)
        if len(y) >= 50:  # noisy per-step values: faint raw line, smoothed line on top
            ax.plot(x, y, color=color, linewidth=0.8, alpha=0.25)
            ax.plot(x, _ema(y, span=max(5, len(y) // 30)), color=color, linewidth=1.5, label=key)
            smoothed = True
        else:
            _plot_series(ax, records, key, color=color, linewidth=1.2)
    values = [v for k in keys for v in series(records, k)[1]]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    title = "loss terms (train solid" + (", smoothed" if smoothed else "") + "; validation dashed)"
    _style_axes(ax, title, "loss")
    ax.legend(fontsize=8, ncol=2)
    return _save(plt, fig, path)


def _ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average (pandas' ``ewm(span=span, adjust=True)``), for display only."""
    alpha = 2.0 / (span + 1)
    num = den = 0.0
    out = []
    for v in values:
        num = (1 - alpha) * num + v
        den = (1 - alpha) * den + 1
        out.append(num / den)
    return out


def _line_plot(plt, records, keys: list[str], title: str, ylabel: str, path: Path) -> Path | None:
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in keys:
        _plot_series(ax, records, key)
    _style_axes(ax, title, ylabel)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _recall_plot(plt, records, keys: list[str], evaluations: list[Evaluation], path: Path) -> Path | None:
    if not keys:
        return None
    fig, (ax, ax_k) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for key in keys:
        _plot_series(ax, records, key, label=f"Recall@{_RECALL.match(key).group(1)}")
    _style_axes(ax, "Recall@K against the bank, over training", "recall")
    ax.legend(fontsize=8)
    last_step = max(s for k in keys for s in series(records, k)[0])
    last = [(int(_RECALL.match(k).group(1)), dict(zip(*series(records, k))).get(last_step)) for k in keys]
    last = [(k, v) for k, v in last if v is not None]
    ax_k.plot([k for k, _ in last], [v for _, v in last], marker="o", label=f"validation, step {last_step}")
    for ev in evaluations:
        pts = sorted((int(k.split("@")[1]), v) for k, v in (ev.data.get("retrieval") or {}).items()
                     if re.fullmatch(r"recall@\d+", k) and _number(v) is not None)
        if pts:
            ax_k.plot([k for k, _ in pts], [v for _, v in pts], marker="s", linestyle="--",
                      label=f"evaluation: {ev.name}")
    ax_k.set_xscale("log")
    ks = sorted({k for k, _ in last})
    ax_k.set_xticks(ks, [str(k) for k in ks])
    ax_k.minorticks_off()
    ax_k.set_title("Recall@K against K")
    ax_k.set_xlabel("K")
    ax_k.grid(alpha=0.3)
    ax_k.legend(fontsize=8)
    return _save(plt, fig, path)


def _grid_plot(plt, records, keys: list[str], title: str, path: Path, cols: int = 3) -> Path | None:
    if not keys:
        return None
    cols = min(cols, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.5 * rows + 0.5), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _plot_series(ax, records, key, markersize=2)
        ax.set_title(key, fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.yaxis.get_offset_text().set_fontsize(7)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(plt, fig, path)


def _per_class_f1(plt, ev: Evaluation, path: Path) -> Path | None:
    f1 = {str(k): v for k, v in (ev.data.get("per_class_f1") or {}).items() if _number(v) is not None}
    if not f1:
        return None
    items = sorted(f1.items(), key=lambda kv: (kv[1], kv[0]))
    n = len(items)
    fig, ax = plt.subplots(figsize=(9, max(3.0, 1.0 + 0.2 * n)))
    bars = ax.barh(range(n), [v for _, v in items], color="tab:blue", height=0.75)
    ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=6)
    ax.set_yticks(range(n), [k for k, _ in items], fontsize=7)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(0, 1.06)
    ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("F1")
    macro = _number(ev.data.get("macro_f1"))
    ax.set_title(f"per-class F1 on {ev.name}" + (f" (macro-F1 {macro:.3f})" if macro is not None else ""))
    if macro is not None:
        ax.axvline(macro, color="k", linestyle=":", linewidth=1)
    ax.grid(axis="x", alpha=0.3)
    return _save(plt, fig, path)


def _confusions(plt, ev: Evaluation, path: Path, top: int = 20) -> Path | None:
    pairs = [p for p in (ev.data.get("confusion_pairs") or []) if isinstance(p, (list, tuple)) and len(p) == 3]
    if not pairs:
        return None
    pairs = sorted(pairs, key=lambda p: -p[2])[:top][::-1]
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.6 + 0.3 * len(pairs))))
    bars = ax.barh(range(len(pairs)), [c for _, _, c in pairs], color="tab:red", height=0.7)
    ax.bar_label(bars, padding=2, fontsize=7)
    ax.set_yticks(range(len(pairs)), [f"{a} → {b}" for a, b, _ in pairs], fontsize=8)
    ax.set_ylim(-0.6, len(pairs) - 0.4)
    ax.margins(x=0.08)
    ax.set_xlabel("rows (true label → predicted label)")
    ax.set_title(f"{len(pairs)} most confused label pairs on {ev.name}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="x", alpha=0.3)
    return _save(plt, fig, path)


# -------------------------------------------------------------------------------------------------- build


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
    plt = _plt()
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _PLOT_FILES:  # our plots from an earlier report that this one may not redraw
        for old in out.glob(pattern):
            old.unlink()

    g = _groups(metric_names(records))
    plots = [
        _loss_plot(plt, records, g["loss"], out / "loss.png"),
        _line_plot(plt, records, g["lr"], "learning rate", "lr", out / "lr.png"),
        _line_plot(plt, records, g["val_classifier"], "validation: classifier head", "score",
                   out / "val_classifier.png"),
        _line_plot(plt, records, g["val_knn"], "validation: k-NN against the bank", "score", out / "val_knn.png"),
        _recall_plot(plt, records, g["val_recall"], evaluations, out / "val_recall.png"),
        _grid_plot(plt, records, g["bank"], "embedding bank statistics", out / "bank.png"),
        _grid_plot(plt, records, g["train_diagnostics"], "training diagnostics", out / "train_diagnostics.png"),
        _grid_plot(plt, records, g["other"], "other metrics", out / "other.png"),
    ]
    for i, ev in enumerate(evaluations):
        plots.append(_per_class_f1(plt, ev, out / f"per_class_f1_{i}.png"))
        plots.append(_confusions(plt, ev, out / f"confusions_{i}.png"))
    plots = [p for p in plots if p is not None]
    html_path = out / "report.html"
    html_path.write_text(render_html(run_dir, records, plots, evaluations), encoding="utf-8")
    return html_path


# --------------------------------------------------------------------------------------------------- html


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _table(rows: Iterable[Iterable[Any]], header: Iterable[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def render_html(run_dir: Path, records: list[dict[str, Any]], plots: list[Path],
                evaluations: list[Evaluation]) -> str:
    """The self-contained report page (images inlined as base64 data URIs)."""
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    except json.JSONDecodeError:
        summary = None
    config = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    if isinstance(summary, dict):
        summary_html = _table(summary.items())
    else:
        summary_html = "<p>No summary.json (the run has not finished).</p>"
    table = metrics_table(records)
    metrics_html = (_table(([r["name"], r["final"], r["final_step"], r["best"], r["best_step"], r["points"]]
                            for r in table), ["metric", "final", "at step", "best", "at step", "points"])
                    if table else "<p>No metrics logged yet.</p>")
    if not any(r["name"].startswith("val/") for r in table):
        metrics_html += "<p>No validation records yet.</p>"
    ev_html = ""
    for ev in evaluations:
        d = ev.data
        items = [("file", str(ev.path)), ("data", d.get("data")), ("model", d.get("model")), ("rows", d.get("rows")),
                 ("accuracy", d.get("accuracy")), ("macro-F1", d.get("macro_f1")),
                 *(d.get("retrieval") or {}).items()]
        ev_html += f"<h3>{html.escape(ev.name)}</h3>" + _table((k, v) for k, v in items if v is not None)
    if not ev_html:
        ev_html = "<p>No evaluation yet: run <code>metric-ds evaluate</code> on the best model.</p>"
    images = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode("ascii")}">'
        f"<figcaption>{html.escape(p.name)}</figcaption></figure>" for p in plots) or "<p>Nothing to plot yet.</p>"
    last_step = max((int(r["step"]) for r in records), default=None)
    title = html.escape(run_dir.resolve().name)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>metric_ds report: {title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}th,td{{border:1px solid #ccc;padding:2px 8px;font-size:13px;
text-align:left}}th{{background:#f0f0f0}}img{{max-width:100%;border:1px solid #eee}}
pre{{background:#f6f6f6;padding:1em;font-size:12px;overflow:auto}}figure{{margin:1.5em 0}}
figcaption{{font-size:12px;color:#666}}</style></head><body>
<h1>metric_ds run: {title}</h1>
<p>{html.escape(str(run_dir))}: {len(records)} records, last step {_fmt(last_step)}.</p>
<h2>summary</h2>{summary_html}
<h2>metrics: final and best</h2>{metrics_html}
<h2>evaluation</h2>{ev_html}
<h2>plots</h2>{images}
<h2>config</h2><pre>{html.escape(config) if config is not None else "(no config.yaml)"}</pre>
</body></html>
"""
