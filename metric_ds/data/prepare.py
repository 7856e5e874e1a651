"""``metric-ds prepare``: turn any CSV/Parquet/JSONL table into metric_ds's format, with the masks of the two use
cases: every row in both losses, or limited manual labelling (a stratified subset keeps ``classifier_mask = 1``;
``metric_mask`` is 1 for all rows, or only for the labelled ones)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metric_ds.data.io import read_table, table_format
from metric_ds.data.notices import warn
from metric_ds.data.validation import validate_frame
from metric_ds.errors import UserError
from metric_ds.outputs import atomic_output

METRIC_MASK_CHOICES = ("all", "labelled")


def classifier_subset(labels: np.ndarray, fraction: float | None, per_class: int | None, seed: int) -> np.ndarray:
    """0/1 mask of a stratified subset. Deterministic given ``seed``.

    Args:
        labels: class of each row, shape (N,).
        fraction: keep ``round(fraction * n_c)`` rows of each class (halves to even; at least one row).
        per_class: keep ``per_class`` rows of each class (all of a smaller class).
        seed: the random seed.

    Returns:
        int8 mask, shape (N,); all ones when both ``fraction`` and ``per_class`` are None.
    """
    labels = np.asarray(labels)
    if fraction is None and per_class is None:
        return np.ones(len(labels), dtype=np.int8)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=np.int8)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        take = per_class if per_class is not None else max(1, round(fraction * len(idx)))
        mask[rng.permutation(idx)[: min(take, len(idx))]] = 1
    return mask


def write_table(df: pd.DataFrame, output: str | Path) -> None:
    """Write by extension (Parquet, CSV or JSON Lines), atomically (:func:`metric_ds.outputs.atomic_output`: a
    partial file renamed into place; a failed write is a :class:`~metric_ds.errors.UserError` naming ``output``)."""
    output = Path(output)
    fmt = table_format(output)
    with atomic_output(output) as tmp:
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        elif fmt == "csv":
            df.to_csv(tmp, index=False, encoding="utf-8")
        else:
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)


def _check_options(output: str | Path, text_column: str, label_column: str, classifier_fraction: float | None,
                   classifier_per_class: int | None, metric_mask: str) -> list[str]:
    problems = []
    if classifier_fraction is not None and classifier_per_class is not None:
        problems.append("give --classifier-fraction or --classifier-per-class, not both")
    if classifier_fraction is not None and not 0 < classifier_fraction <= 1:
        problems.append(f"--classifier-fraction must be in (0, 1], got {classifier_fraction}")
    if classifier_per_class is not None and classifier_per_class < 1:
        problems.append(f"--classifier-per-class must be >= 1, got {classifier_per_class}")
    if metric_mask not in METRIC_MASK_CHOICES:
        problems.append(f"--metric-mask must be one of {', '.join(METRIC_MASK_CHOICES)}, got {metric_mask!r}")
    if text_column == label_column:
        problems.append(f"--text-column and --label-column are both {text_column!r}; name two columns")
    try:
        table_format(output)
    except UserError as exc:
        problems.append(f"--output {exc.messages[0]}")
    return problems


def prepare(input: str | Path, output: str | Path, text_column: str = "text", label_column: str = "label",
            classifier_fraction: float | None = None, classifier_per_class: int | None = None,
            metric_mask: str = "all", seed: int = 0) -> dict[str, Any]:
    """Convert a table; validate everything before writing anything.

    The output has the columns ``text``, ``label``, ``metric_mask``, ``classifier_mask`` (other input columns,
    and any masks the input had, are not kept). Text is kept exactly as given (not stripped); labels keep their
    type. Rows that end with both masks 0 (``--metric-mask labelled`` and outside the labelled subset) are left
    out, with a warning.

    Args:
        input: the source table (.parquet/.pq, .csv, .jsonl/.json).
        output: the prepared table; its extension picks the format.
        text_column, label_column: the input's columns holding the text and the class.
        classifier_fraction: limited labelling: a stratified share of each class keeps classifier_mask = 1.
        classifier_per_class: limited labelling: this many rows of each class keep classifier_mask = 1.
        metric_mask: ``all`` (every row in SupCon) or ``labelled`` (metric_mask = classifier_mask).
        seed: for the labelled subset.

    Returns:
        Counts of the written table: rows, classes, classifier_rows, metric_rows.

    Raises:
        UserError: bad options, an unreadable input, missing columns (named, with the columns present) or bad
            rows; nothing is written then.
    """
    problems = _check_options(output, text_column, label_column, classifier_fraction, classifier_per_class,
                              metric_mask)
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
    df["metric_mask"] = np.ones(len(df), dtype=np.int8) if metric_mask == "all" else cmask
    keep = (df["metric_mask"] == 1) | (df["classifier_mask"] == 1)
    if not keep.all():
        warn(f"{input}: left out {int((~keep).sum())} row(s) outside the labelled subset "
             "(--metric-mask labelled gives them neither loss)")
        df = df[keep].reset_index(drop=True)
    write_table(df, output)
    return {"rows": len(df), "classes": int(df["label"].nunique()),
            "classifier_rows": int(df["classifier_mask"].sum()), "metric_rows": int(df["metric_mask"].sum())}
