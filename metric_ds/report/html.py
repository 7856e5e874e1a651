"""The self-contained ``report.html``: tables of the run and its evaluations, the plots as data URIs."""
from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from metric_ds.report.records import Evaluation, metrics_table


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
