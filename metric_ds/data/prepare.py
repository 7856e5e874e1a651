"""``metric-ds prepare``: turn any CSV/Parquet/JSONL table into metric_ds's format, with the masks of the two use
cases (all rows in both losses; or limited manual labelling: a stratified subset keeps ``classifier_mask = 1``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metric_ds.data.io import read_table, table_format
from metric_ds.data.validation import validate_frame
from metric_ds.errors import UserError


def classifier_subset(labels: np.ndarray, fraction: float | None, per_class: int | None, seed: int) -> np.ndarray:
    """0/1 mask of a stratified subset: ``per_class`` rows of each class (all if fewer), or
    ``round(fraction * n_c)`` rows of each class (at least one). Deterministic given ``seed``."""
    if fraction is None and per_class is None:
        return np.ones(len(labels), dtype=np.int8)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=np.int8)
    for cls in sorted(set(labels.tolist()), key=str):
        idx = np.flatnonzero(labels == cls)
        take = per_class if per_class is not None else max(1, int(round(fraction * len(idx))))
        mask[rng.permutation(idx)[: min(take, len(idx))]] = 1
    return mask


def write_table(df: pd.DataFrame, output: str | Path) -> None:
    """Write by extension, atomically (a temporary file renamed into place)."""
    output = Path(output)
    fmt = table_format(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    if fmt == "parquet":
        df.to_parquet(tmp, index=False)
    elif fmt == "csv":
        df.to_csv(tmp, index=False)
    else:
        df.to_json(tmp, orient="records", lines=True, force_ascii=False)
    os.replace(tmp, output)


def prepare(input: str | Path, output: str | Path, text_column: str = "text", label_column: str = "label",
            classifier_fraction: float | None = None, classifier_per_class: int | None = None,
            metric_mask: str = "all", seed: int = 0) -> dict[str, Any]:
    """Convert a table; validate everything before writing anything.

    Args:
        input, output: tables; formats by extension.
        text_column, label_column: the input's columns.
        classifier_fraction, classifier_per_class: limited labelling (mutually exclusive).
        metric_mask: ``all`` (every row in SupCon) or ``labelled`` (only rows with classifier_mask = 1).
        seed: for the subset.

    Returns:
        Counts: rows, classes, classifier_rows, metric_rows.
    """
    problems = []
    if classifier_fraction is not None and classifier_per_class is not None:
        problems.append("give --classifier-fraction or --classifier-per-class, not both")
    if classifier_fraction is not None and not 0 < classifier_fraction <= 1:
        problems.append(f"--classifier-fraction must be in (0, 1], got {classifier_fraction}")
    if classifier_per_class is not None and classifier_per_class < 1:
        problems.append(f"--classifier-per-class must be >= 1, got {classifier_per_class}")
    if metric_mask not in ("all", "labelled"):
        problems.append(f"--metric-mask must be all or labelled, got {metric_mask!r}")
    table_format(output)
    if problems:
        raise UserError(problems)
    raw = read_table(input)
    missing = [c for c in (text_column, label_column) if c not in raw.columns]
    if missing:
        raise UserError(f"{input}: missing column(s) {', '.join(missing)} (--text-column/--label-column); "
                        f"the table has {', '.join(map(str, raw.columns))}")
    df = pd.DataFrame({"text": raw[text_column], "label": raw[label_column], "metric_mask": 1,
                       "classifier_mask": 1})
    df = validate_frame(df, str(input))
    cmask = classifier_subset(df["label"].to_numpy(), classifier_fraction, classifier_per_class, seed)
    df["classifier_mask"] = cmask
    df["metric_mask"] = 1 if metric_mask == "all" else cmask
    df = df[(df["metric_mask"] == 1) | (df["classifier_mask"] == 1)].reset_index(drop=True)
    write_table(df, output)
    return {"rows": len(df), "classes": int(df["label"].nunique()),
            "classifier_rows": int(df["classifier_mask"].sum()), "metric_rows": int(df["metric_mask"].sum())}
