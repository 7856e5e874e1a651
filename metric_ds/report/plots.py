"""The report's PNG plots, one function a plot (matplotlib, Agg backend)."""
from __future__ import annotations

import re
from pathlib import Path

from metric_ds.errors import EnvironmentProblem
from metric_ds.report.records import RECALL, Evaluation, metric_suffix, number, series

DPI = 110


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EnvironmentProblem("metric-ds report needs matplotlib: pip install matplotlib "
                                 "(or pip install 'metric-ds[report]')") from None
    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
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


def loss_plot(plt, records, keys: list[str], path: Path) -> Path | None:
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    terms = list(dict.fromkeys(metric_suffix(k) for k in keys))
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


def line_plot(plt, records, keys: list[str], title: str, ylabel: str, path: Path) -> Path | None:
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in keys:
        _plot_series(ax, records, key)
    _style_axes(ax, title, ylabel)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def recall_plot(plt, records, keys: list[str], evaluations: list[Evaluation], path: Path) -> Path | None:
    if not keys:
        return None
    fig, (ax, ax_k) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for key in keys:
        _plot_series(ax, records, key, label=f"Recall@{RECALL.match(key).group(1)}")
    _style_axes(ax, "Recall@K against the bank, over training", "recall")
    ax.legend(fontsize=8)
    last_step = max(s for k in keys for s in series(records, k)[0])
    last = [(int(RECALL.match(k).group(1)), dict(zip(*series(records, k))).get(last_step)) for k in keys]
    last = [(k, v) for k, v in last if v is not None]
    ax_k.plot([k for k, _ in last], [v for _, v in last], marker="o", label=f"validation, step {last_step}")
    for ev in evaluations:
        pts = sorted((int(k.split("@")[1]), v) for k, v in (ev.data.get("retrieval") or {}).items()
                     if re.fullmatch(r"recall@\d+", k) and number(v) is not None)
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


def grid_plot(plt, records, keys: list[str], title: str, path: Path, cols: int = 3) -> Path | None:
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


def per_class_f1_plot(plt, ev: Evaluation, path: Path) -> Path | None:
    f1 = {str(k): v for k, v in (ev.data.get("per_class_f1") or {}).items() if number(v) is not None}
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
    macro = number(ev.data.get("macro_f1"))
    ax.set_title(f"per-class F1 on {ev.name}" + (f" (macro-F1 {macro:.3f})" if macro is not None else ""))
    if macro is not None:
        ax.axvline(macro, color="k", linestyle=":", linewidth=1)
    ax.grid(axis="x", alpha=0.3)
    return _save(plt, fig, path)


def confusions_plot(plt, ev: Evaluation, path: Path, top: int = 20) -> Path | None:
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
