"""``metric-ds report RUN_DIR``: PNG plots of a run and one self-contained ``report.html``.

Plots: loss terms, learning rate, validation accuracy/F1 and k-NN metrics, Recall@K, the bank statistics over
steps, and, when ``metric-ds evaluate`` has written an evaluation (``RUN_DIR/eval/*.json`` or
``RUN_DIR/best/eval/*.json``), per-class F1 and the 20 most confused label pairs. The HTML embeds the images,
so the one file can be mailed. Matplotlib is an optional extra (``pip install metric-ds[report]``).
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from metric_ds.errors import EnvironmentProblem, UserError


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EnvironmentProblem("metric-ds report needs matplotlib: pip install matplotlib "
                                 "(or metric-ds[report])") from None
    return plt


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; is this a run folder (checkpoints_dir/run_name)?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def find_evaluations(run_dir: Path) -> list[Path]:
    return sorted([*run_dir.glob("eval/*.json"), *run_dir.glob("best/eval/*.json")])


def _line_plot(plt, records, keys: list[str], title: str, ylabel: str, path: Path, logy: bool = False) -> Path | None:
    present = [k for k in keys if series(records, k)[0]]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in present:
        x, y = series(records, key)
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=key)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bank_grid(plt, records, path: Path) -> Path | None:
    keys = sorted({k for r in records for k in r if k.startswith("bank/") and k != "bank/classes_total"})
    keys = [k for k in keys if series(records, k)[0]]
    if not keys:
        return None
    cols = 3
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        x, y = series(records, key)
        ax.plot(x, y, marker="o", markersize=2)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("embedding bank statistics (at each validation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _per_class_f1(plt, evaluation: dict[str, Any], path: Path) -> Path | None:
    f1 = evaluation.get("per_class_f1")
    if not f1:
        return None
    items = sorted(f1.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(8, max(4, 0.16 * len(items))))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title(f"per-class F1 on {Path(evaluation.get('data', 'test')).name} "
                 f"(macro {evaluation.get('macro_f1', float('nan')):.3f})")
    ax.tick_params(axis="y", labelsize=6)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _confusions(plt, evaluation: dict[str, Any], path: Path) -> Path | None:
    pairs = evaluation.get("confusion_pairs") or []
    if not pairs:
        return None
    pairs = pairs[:20][::-1]
    fig, ax = plt.subplots(figsize=(11, max(3, 0.3 * len(pairs))))
    ax.barh([f"{a} → {b}" for a, b, _ in pairs], [c for _, _, c in pairs], color="tab:red")
    ax.set_xlabel("rows (true → predicted)")
    ax.set_title("most confused label pairs")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, evaluation: str | Path | None = None) -> Path:
    """Write the plots and ``report.html``; returns the HTML's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    records = read_records(run_dir)
    plt = _plt()
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    recall_keys = sorted({k for r in records for k in r if k.startswith("val/recall@")},
                         key=lambda k: int(k.split("@")[1]))
    plots = [
        _line_plot(plt, records, ["train/loss", "train/ce", "train/supcon", "val/loss", "val/ce", "val/supcon"],
                   "loss terms", "loss", out / "loss.png"),
        _line_plot(plt, records, ["train/lr"], "learning rate", "lr", out / "lr.png"),
        _line_plot(plt, records, ["val/acc", "val/f1", "val/knn_acc", "val/knn_f1"],
                   "validation: classifier and k-NN", "score", out / "val_classification.png"),
        _line_plot(plt, records, recall_keys, "validation: Recall@K against the bank", "recall",
                   out / "val_recall.png"),
        _bank_grid(plt, records, out / "bank.png"),
    ]
    eval_paths = [Path(evaluation)] if evaluation else find_evaluations(run_dir)
    evaluations = []
    for i, path in enumerate(eval_paths):
        ev = json.loads(path.read_text())
        evaluations.append((path, ev))
        plots.append(_per_class_f1(plt, ev, out / f"per_class_f1_{i}.png"))
        plots.append(_confusions(plt, ev, out / f"confusions_{i}.png"))
    plots = [p for p in plots if p is not None]
    html_path = out / "report.html"
    html_path.write_text(_html(run_dir, records, plots, evaluations))
    return html_path


def _html(run_dir: Path, records, plots: list[Path], evaluations) -> str:
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    config = config_path.read_text() if config_path.is_file() else "(no config.yaml)"
    last_val = next((r for r in reversed(records) if "val/acc" in r or "val/loss" in r), {})
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in summary.items())
    val_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in last_val.items())
    ev_html = ""
    for path, ev in evaluations:
        items = [("data", ev.get("data")), ("rows", ev.get("rows")), ("accuracy", ev.get("accuracy")),
                 ("macro-F1", ev.get("macro_f1")), *ev.get("retrieval", {}).items()]
        ev_html += (f"<h3>evaluation: {html.escape(path.name)}</h3><table>" +
                    "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                            for k, v in items if v is not None) + "</table>")
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.name}</figcaption></figure>" for p in plots)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>metric_ds report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}
img{{max-width:100%;border:1px solid #eee}}pre{{background:#f6f6f6;padding:1em;font-size:12px;overflow:auto}}
figure{{margin:1.5em 0}}</style></head><body>
<h1>metric_ds run: {html.escape(run_dir.name)}</h1>
<h2>summary</h2><table>{rows}</table>
{ev_html}
<h2>last validation record</h2><table>{val_rows}</table>
<h2>plots</h2>{images}
<h2>config</h2><pre>{html.escape(config)}</pre>
</body></html>
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
