"""The run report: plots are valid PNGs, report.html is self-contained and shows the numbers; missing pieces."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from metric_ds.errors import UserError
from metric_ds.metrics import lower_is_better
from metric_ds.report import (
    build_report,
    find_evaluations,
    metrics_table,
    read_records,
    series,
)

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BANK_KEYS = ["bank/size", "bank/classes_covered", "bank/mean_age", "bank/norm_mean", "bank/norm_std",
             "bank/intra_cos", "bank/inter_centroid_cos", "bank/alignment", "bank/uniformity"]


def make_run(root: Path, steps: int = 60, val_every: int = 10, num_classes: int = 12, seed: int = 0,
             with_val: bool = True, with_summary: bool = True, with_eval: bool = True) -> Path:
    """A fake run folder shaped like the training loop's: metrics.jsonl, config.yaml, summary.json, eval JSON."""
    rng = np.random.default_rng(seed)
    run = root / "demo-run"
    run.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        ce, sc = 2.5 * np.exp(-step / 20) + 0.05 * rng.random(), 3.0 * np.exp(-step / 30) + 0.05 * rng.random()
        rec = {"step": step, "epoch": step / 20, "train/loss": ce + sc, "train/ce": ce, "train/supcon": sc,
               "train/lr": 2e-5 * min(1.0, step / 10), "train/grad_norm": 1 + rng.random(),
               "train/samples_per_s": 300 + 10 * rng.random(), "train/ce_rows": 32, "train/metric_rows": 28,
               "train/anchor_pos_frac": 0.9}
        if step % 7 == 0:  # a metric that appears only in some records
            rec["train/mean_pos_per_anchor"] = 3.5 + rng.random()
        lines.append(rec)
        if with_val and step % val_every == 0:
            acc = 1 - 0.9 * np.exp(-step / 25)
            decay = np.exp(-step / 25)
            val = {"step": step, "epoch": step / 20, "val/loss": 4 * decay, "val/ce": 2 * decay, "val/supcon": 2 * decay,
                   "val/acc": acc, "val/f1": acc - 0.03,
                   "val/recall@1": acc - 0.05, "val/recall@5": acc, "val/recall@10": min(1.0, acc + 0.04),
                   "val/knn_acc": acc - 0.02, "val/knn_f1": acc - 0.04, "bank/classes_total": num_classes}
            val.update({k: float(rng.random()) for k in BANK_KEYS})
            lines.append(val)
    with (run / "metrics.jsonl").open("w") as fh:
        for rec in lines:
            fh.write(json.dumps({k: (float(v) if isinstance(v, np.floating) else v) for k, v in rec.items()}) + "\n")
    (run / "config.yaml").write_text("run_name: demo-run\ntraining:\n  lr: 2.0e-05\n  epochs: 3\n  note: <b>&</b>\n")
    if with_summary:
        (run / "summary.json").write_text(json.dumps({
            "run_dir": str(run), "best_dir": str(run / "best"), "best_metric": "val/f1", "best_value": 0.8765,
            "best_step": steps, "steps": steps, "epochs": 3, "wall_time_s": 123.456, "train_samples_per_s": 311.25,
            "world_size": 1}))
    if with_eval:
        names = [f"label_{i:02d}_{'x' * (i % 9)}" for i in range(num_classes)]
        pairs = [[names[i], names[(i + 1 + i % 5) % num_classes], int(c)]
                 for i, c in enumerate(sorted(rng.integers(1, 40, size=min(25, num_classes)), reverse=True))]
        ev = {"model": str(run / "best"), "data": "/data/test.parquet", "rows": 400, "accuracy": 0.8125,
              "macro_f1": 0.7931, "per_class_f1": {n: float(rng.random()) for n in names},
              "confusion_pairs": pairs, "retrieval": {"recall@1": 0.71, "recall@5": 0.9, "recall@10": 0.95,
                                                       "knn_acc": 0.8, "knn_f1": 0.78}}
        (run / "best" / "eval").mkdir(parents=True)
        (run / "best" / "eval" / "test.json").write_text(json.dumps(ev))
    return run


def _embedded_pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)]


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path


def test_full_report(tmp_path):
    run = make_run(tmp_path)
    html_path = build_report(run)
    out = run / "report"
    assert html_path == out / "report.html"
    expected = {"loss.png", "lr.png", "val_classifier.png", "val_knn.png", "val_recall.png", "bank.png",
                "train_diagnostics.png", "per_class_f1_0.png", "confusions_0.png"}
    assert {p.name for p in out.glob("*.png")} == expected
    for p in out.glob("*.png"):
        _check_png(p)
    text = html_path.read_text()
    embedded = _embedded_pngs(text)
    assert len(embedded) == len(expected) and all(b[:8] == PNG_MAGIC for b in embedded)
    assert sorted(embedded) == sorted(p.read_bytes() for p in out.glob("*.png"))
    assert "<img" in text and 'src="report/' not in text and "file://" not in text  # self-contained
    for number in ("0.8765", "123.5", "311.2", "val/f1", "0.8125", "0.7931", "recall@5"):
        assert number in text, number
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in text and "<b>&</b>" not in text  # config escaped inside <pre>


def test_metrics_table_final_and_best(tmp_path):
    run = make_run(tmp_path, steps=40, val_every=10, with_eval=False)
    records = read_records(run)
    rows = {r["name"]: r for r in metrics_table(records)}
    acc_steps, acc = series(records, "val/acc")
    assert acc_steps == [10, 20, 30, 40]
    assert rows["val/acc"]["final"] == acc[-1] and rows["val/acc"]["best"] == max(acc)
    assert rows["val/loss"]["best"] == min(series(records, "val/loss")[1]) and rows["val/loss"]["best_step"] == 40
    assert rows["train/loss"]["best"] is None and rows["train/loss"]["points"] == 40
    assert rows["train/mean_pos_per_anchor"]["points"] == 40 // 7
    assert "step" not in rows and "epoch" not in rows


@pytest.mark.parametrize("name, lower", [("val/loss", True), ("val/ce", True), ("val/supcon", True),
                                         ("train/step_time_s", True), ("bank/mean_age", True),
                                         ("val/acc", False), ("val/recall@5", False), ("val/knn_f1", False)])
def test_lower_is_better(name, lower):
    assert lower_is_better(name) is lower


def test_no_validation_no_summary_no_eval(tmp_path):
    run = make_run(tmp_path, steps=15, with_val=False, with_summary=False, with_eval=False)
    html_path = build_report(run, out_dir=tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert names == {"loss.png", "lr.png", "train_diagnostics.png"}
    for p in (tmp_path / "out").glob("*.png"):
        _check_png(p)
    text = html_path.read_text()
    assert "No summary.json" in text and "No validation records yet" in text and "No evaluation yet" in text
    assert len(_embedded_pngs(text)) == 3


def test_explicit_eval_path_and_eval_dir_discovery(tmp_path):
    run = make_run(tmp_path, steps=20, with_eval=True)
    (run / "eval").mkdir()
    other = json.loads((run / "best" / "eval" / "test.json").read_text())
    other["data"] = "/data/holdout.csv"
    (run / "eval" / "holdout.json").write_text(json.dumps(other))
    assert [p.relative_to(run).as_posix() for p in find_evaluations(run)] == ["best/eval/test.json",
                                                                              "eval/holdout.json"]
    text = build_report(run).read_text()
    assert {"per_class_f1_0.png", "per_class_f1_1.png"} <= {p.name for p in (run / "report").glob("*")}
    assert "<h3>test</h3>" in text and "<h3>holdout</h3>" in text
    explicit = tmp_path / "mine.json"
    explicit.write_text(json.dumps({"data": "x/mine.parquet", "accuracy": 0.5, "macro_f1": 0.4,
                                    "per_class_f1": {"a": 0.3, "b": 0.5}}))
    text = build_report(run, out_dir=tmp_path / "r2", evaluation=explicit).read_text()
    assert {p.name for p in (tmp_path / "r2").glob("per_class*")} == {"per_class_f1_0.png"}
    assert not list((tmp_path / "r2").glob("confusions_*"))  # no confusion pairs in that file
    assert "mine" in text and "holdout" not in text


def test_resumed_run_and_truncated_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    recs = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 6)]
    recs += [{"step": s, "train/loss": 2.0 / s} for s in range(4, 8)]  # resumed from step 3: steps 4, 5 replayed
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 8, "train/lo'  # cut short by a crash
    (run / "metrics.jsonl").write_text(text)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        records = read_records(run)
    steps, values = series(records, "train/loss")
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert values == pytest.approx([1.0, 0.5, 1 / 3, 0.5, 0.4, 1 / 3, 2 / 7])
    with pytest.warns(UserWarning):
        build_report(run)
    _check_png(run / "report" / "loss.png")


@pytest.mark.parametrize("setup, match", [("no_dir", "no such run folder"), ("no_jsonl", "no metrics.jsonl"),
                                          ("bad_eval", "not valid JSON"), ("missing_eval", "no such evaluation")])
def test_user_errors(tmp_path, setup, match):
    run = tmp_path / "run"
    evaluation = None
    if setup != "no_dir":
        run.mkdir()
    if setup in ("bad_eval", "missing_eval"):
        (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
        evaluation = tmp_path / "e.json"
        if setup == "bad_eval":
            evaluation.write_text("{not json")
    with pytest.raises(UserError, match=match):
        build_report(run, evaluation=evaluation)
