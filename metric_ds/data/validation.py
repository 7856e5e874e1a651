"""Checking a table against metric_ds's format; every problem is gathered into one error."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from metric_ds.errors import UserError, format_rows

log = logging.getLogger("metric_ds")

REQUIRED = ("text", "label", "metric_mask", "classifier_mask")
MASKS = ("metric_mask", "classifier_mask")


def _mask_values(series: pd.Series) -> tuple[np.ndarray, list[int], list[int]]:
    """0/1 values of a mask column, with the positions of nulls and of values outside {0, 1, True, False}."""
    nulls = np.flatnonzero(series.isna().to_numpy())
    out = np.zeros(len(series), dtype=np.int8)
    bad = []
    null_set = set(nulls.tolist())
    for i, v in enumerate(series.tolist()):
        if i in null_set:
            continue
        if isinstance(v, (bool, np.bool_)):
            out[i] = int(v)
        elif isinstance(v, (int, np.integer, float, np.floating)) and float(v) in (0.0, 1.0):
            out[i] = int(v)
        else:
            bad.append(i)
    return out, nulls.tolist(), bad


def validate_frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check and normalise a table.

    Args:
        df: the raw table.
        source: the file name (or "DataFrame") for messages.

    Returns:
        A new frame with ``text`` (str), ``label`` (as given), ``metric_mask`` and ``classifier_mask``
        (int8 0/1), without the rows whose masks are both 0 (dropped with a warning).

    Raises:
        UserError: listing every problem, with the column and the first rows (numbered from 1, header not
            counted).
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)}; the table has "
                        f"{', '.join(map(str, df.columns))}. Convert it with `metric-ds prepare`")
    problems: list[str] = []
    text = df["text"]
    bad_text = [i for i, v in enumerate(text.tolist()) if not isinstance(v, str) or not v.strip()]
    if bad_text:
        problems.append(f"{source}: column text: null, empty or whitespace-only text in {format_rows(bad_text)}; "
                        "remove those rows or fill in the text")
    labels = df["label"]
    null_labels = np.flatnonzero(labels.isna().to_numpy()).tolist()
    if null_labels:
        problems.append(f"{source}: column label: null labels in {format_rows(null_labels)}; every row needs a label")
    kinds: dict[str, list[int]] = {}
    null_set = set(null_labels)
    for i, v in enumerate(labels.tolist()):
        if i in null_set:
            continue
        kind = "str" if isinstance(v, str) else "int" if isinstance(v, (int, np.integer)) or (
            isinstance(v, (float, np.floating)) and float(v).is_integer()) else type(v).__name__
        kinds.setdefault(kind, []).append(i)
    if len(kinds) > 1:
        parts = "; ".join(f"{k} in {format_rows(rows)}" for k, rows in kinds.items())
        problems.append(f"{source}: column label: labels of mixed types ({parts}); use one type for all labels")
    masks = {}
    for col in MASKS:
        values, nulls, bad = _mask_values(df[col])
        if nulls:
            problems.append(f"{source}: column {col}: null values in {format_rows(nulls)}; use 0 or 1")
        if bad:
            shown = ", ".join(repr(df[col].iloc[i]) for i in bad[:3])
            problems.append(f"{source}: column {col}: values outside {{0, 1, True, False}} ({shown}) in "
                            f"{format_rows(bad)}")
        masks[col] = values
    if problems:
        raise UserError(problems)
    out = pd.DataFrame({
        "text": text.astype(str).to_numpy(),
        "label": [int(v) if "int" in kinds and not isinstance(v, str) else v for v in labels.tolist()],
        "metric_mask": masks["metric_mask"],
        "classifier_mask": masks["classifier_mask"],
    })
    keep = (out["metric_mask"] == 1) | (out["classifier_mask"] == 1)
    dropped = int((~keep).sum())
    if dropped:
        log.warning("%s: dropped %d row(s) with both metric_mask and classifier_mask 0", source, dropped)
        out = out[keep].reset_index(drop=True)
    if len(out) == 0:
        raise UserError(f"{source}: no row has metric_mask or classifier_mask set")
    return out
