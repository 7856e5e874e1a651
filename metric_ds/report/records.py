"""Reading a run for its report: the records of ``metrics.jsonl``, metric series and their groups, and
``metric-ds evaluate`` files."""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metric_ds.errors import UserError, read_mapping
from metric_ds.metrics import lower_is_better

LOSS_SUFFIX = re.compile(r"^(loss|ce|supcon|.*_loss)$")
RECALL = re.compile(r"^val/recall@(\d+)$")


@dataclass
class Evaluation:
    """One ``metric-ds evaluate`` result file."""

    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        """A short label for titles: the evaluated table's stem (``test``), else the JSON's stem."""
        return Path(str(self.data.get("data") or self.path.stem)).stem or "eval"


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


def number(value: Any) -> float | None:
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
        value = number(r.get(key))
        if value is not None:
            by_step[int(r["step"])] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def metric_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every metric name with at least one numeric value, in first-seen order (``step``/``epoch`` excluded)."""
    names: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in ("step", "epoch") and number(v) is not None:
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
    data = read_mapping(Path(path), "evaluation file", "JSON", json.loads, json.JSONDecodeError,
                        "write it (again) with `metric-ds evaluate`")
    return Evaluation(Path(path), data)


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


def metric_suffix(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def groups(names: list[str]) -> dict[str, list[str]]:
    """Metric names per plot."""
    groups: dict[str, list[str]] = {k: [] for k in ("loss", "lr", "val_classifier", "val_knn", "val_recall",
                                                    "bank", "train_diagnostics", "other")}
    for name in names:
        prefix = name.split("/", 1)[0] if "/" in name else ""
        suffix = metric_suffix(name)
        if prefix in ("train", "val") and LOSS_SUFFIX.match(suffix):
            groups["loss"].append(name)
        elif prefix == "train" and suffix == "lr":
            groups["lr"].append(name)
        elif prefix == "train":
            groups["train_diagnostics"].append(name)
        elif RECALL.match(name):
            groups["val_recall"].append(name)
        elif prefix == "val" and suffix.startswith("knn"):
            groups["val_knn"].append(name)
        elif prefix == "val":
            groups["val_classifier"].append(name)
        elif prefix == "bank":
            groups["bank"].append(name)
        else:
            groups["other"].append(name)
    groups["val_recall"].sort(key=lambda n: int(RECALL.match(n).group(1)))
    return groups
