"""Checking a table against metric_ds's format; every problem is gathered into one error.

The format: ``text`` (non-empty strings), ``label`` (strings or integers, one type for the whole table),
``metric_mask`` and ``classifier_mask`` (0/1; ``True``/``False`` and the strings ``"0"``, ``"1"``, ``"true"``,
``"false"`` are accepted). Other columns are ignored. Rows are numbered from 1 as in a spreadsheet (header not
counted).

A training table may also hold *label-free* rows: a null label with ``metric_mask = 1`` and
``classifier_mask = 0`` (``allow_label_free``). They take part in SupCon each as its own class, with a second
view of themselves as the positive (:mod:`metric_ds.losses`); a null label with any other masks is an error.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from metric_ds.data.labels import native
from metric_ds.data.notices import warn
from metric_ds.errors import UserError, format_rows

REQUIRED = ("text", "label", "metric_mask", "classifier_mask")
MASKS = ("metric_mask", "classifier_mask")
_MASK_STRINGS = {"0": 0, "1": 1, "true": 1, "false": 0}


def _is_null(v: object) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, (float, np.floating)) and np.isnan(v))


def _check_text(values: list, source: str) -> list[str]:
    blank, not_str = [], {}
    for i, v in enumerate(values):
        if isinstance(v, str):
            if not v.strip():
                blank.append(i)
        elif _is_null(v):
            blank.append(i)
        else:
            not_str.setdefault(type(v).__name__, []).append(i)
    problems = []
    if blank:
        problems.append(f"{source}: column text: null, empty or whitespace-only text in {format_rows(blank)}; "
                        "remove those rows or fill in the text")
    for kind, rows in not_str.items():
        problems.append(f"{source}: column text: values that are not text ({kind}) in {format_rows(rows)}; "
                        "every text must be a string")
    return problems


def _label_kind(v: object) -> str:
    if isinstance(v, str):
        return "str"
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer()):
        return "int"
    return type(v).__name__


def _null_label_problem(nulls: list[int], masks: dict[str, np.ndarray] | None, source: str) -> str | None:
    """The message for null labels, or None when every one is a label-free row (``masks`` given: label-free rows
    are allowed; their masks must be metric 1, classifier 0)."""
    if not nulls:
        return None
    if masks is None:
        return f"{source}: column label: null labels in {format_rows(nulls)}; every row needs a label"
    bad = [i for i in nulls if masks["classifier_mask"][i] == 1 or masks["metric_mask"][i] == 0]
    if not bad:
        return None
    return (f"{source}: column label: null labels in {format_rows(bad)}, which have classifier_mask = 1 or "
            "metric_mask = 0; a row without a label can only train SupCon, as a label-free row (metric_mask = 1, "
            "classifier_mask = 0): give those rows labels, or set their metric_mask to 1 and classifier_mask to 0")


def _check_labels(values: list, source: str, masks: dict[str, np.ndarray] | None = None) -> tuple[list[str], list]:
    """Problems, and the labels normalised (integer-valued floats become ints, numpy scalars Python's, nulls
    None). ``masks``: label-free rows are allowed (see :func:`_null_label_problem`)."""
    nulls, kinds = [], {}
    for i, v in enumerate(values):
        if _is_null(v):
            nulls.append(i)
        else:
            kinds.setdefault(_label_kind(v), []).append(i)
    problems = []
    null_problem = _null_label_problem(nulls, masks, source)
    if null_problem:
        problems.append(null_problem)
    elif not kinds:
        problems.append(f"{source}: column label: every label is null; label some rows (at least two classes)")
    if len(kinds) > 1:
        parts = "; ".join(f"{k} in {format_rows(rows)}" for k, rows in kinds.items())
        problems.append(f"{source}: column label: labels of mixed types ({parts}); use one type for all labels")
    elif kinds and next(iter(kinds)) not in ("str", "int"):
        kind, rows = next(iter(kinds.items()))
        problems.append(f"{source}: column label: labels must be strings or integers, found {kind} in "
                        f"{format_rows(rows)}; convert them to integers or to strings")
    if problems:
        return problems, []
    null = set(nulls)
    if "int" in kinds:
        return [], [None if i in null else int(v) for i, v in enumerate(values)]
    return [], [None if i in null else str(v) for i, v in enumerate(values)]


def _mask_values(series: pd.Series) -> tuple[np.ndarray, list[int], list[int]]:
    """0/1 values of a mask column, with the positions of nulls and of values outside {0, 1, True, False}."""
    arr = series.to_numpy()
    if series.dtype == bool or (pd.api.types.is_integer_dtype(series.dtype) and not series.hasnans):
        arr = arr.astype(np.int64)
        bad = np.flatnonzero((arr != 0) & (arr != 1)).tolist()
        return np.where(arr == 1, 1, 0).astype(np.int8), [], bad
    out = np.zeros(len(series), dtype=np.int8)
    nulls, bad = [], []
    for i, v in enumerate(arr.tolist()):
        if _is_null(v):
            nulls.append(i)
        elif isinstance(v, (bool, np.bool_, int, np.integer, float, np.floating)) and float(v) in (0.0, 1.0):
            out[i] = int(v)
        elif isinstance(v, str) and v.strip().lower() in _MASK_STRINGS:
            out[i] = _MASK_STRINGS[v.strip().lower()]
        else:
            bad.append(i)
    return out, nulls, bad


def _check_masks(df: pd.DataFrame, source: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The 0/1 values of the mask columns present, and their problems."""
    masks, problems = {}, []
    for col in MASKS:
        if col not in df.columns:
            continue
        values, nulls, bad = _mask_values(df[col])
        if nulls:
            problems.append(f"{source}: column {col}: null values in {format_rows(nulls)}; use 0 or 1")
        if bad:
            shown = ", ".join(repr(native(df[col].iloc[i])) for i in bad[:3])
            problems.append(f"{source}: column {col}: values outside {{0, 1, True, False}} ({shown}) in "
                            f"{format_rows(bad)}; use 0 or 1")
        masks[col] = values
    return masks, problems


def _label_series(labels: list) -> pd.Series:
    """The normalised labels as a column: int64 (or pandas' nullable Int64 with label-free rows, which are <NA>)
    for integer labels, object for strings (None for label-free rows)."""
    if any(isinstance(v, int) for v in labels):
        return pd.Series(labels, dtype="Int64" if any(v is None for v in labels) else "int64")
    return pd.Series(labels, dtype=object)


def validate_frame(df: pd.DataFrame, source: str, warnings_out: list[str] | None = None,
                   allow_label_free: bool = False) -> pd.DataFrame:
    """Check and normalise a table.

    Args:
        df: the raw table.
        source: the file name (or "DataFrame") for messages.
        warnings_out: if given, warnings (rows dropped) are appended to it as well as logged on the
            ``metric_ds`` logger.
        allow_label_free: a null label is valid in rows with ``metric_mask = 1`` and ``classifier_mask = 0``
            (label-free rows, for training); otherwise every row needs a label.

    Returns:
        A new frame with ``text`` (str), ``label`` (the labels as given: all int or all str; null in label-free
        rows),
        ``metric_mask`` and ``classifier_mask`` (int8 0/1), without the rows whose masks are both 0 (dropped
        with a warning that gives their count). The index is 0..n-1.

    Raises:
        UserError: listing every problem, each with the file, the column and the first rows.
    """
    if len(df) == 0:
        raise UserError(f"{source}: the table has no rows")
    problems: list[str] = []
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        problems.append(f"{source}: missing column(s) {', '.join(missing)}; the table has "
                        f"{', '.join(map(str, df.columns))}. Convert it with `metric-ds prepare`")
    if "text" in df.columns:
        problems += _check_text(df["text"].tolist(), source)
    masks, mask_problems = _check_masks(df, source)
    labels: list = []
    if "label" in df.columns:
        # label-free rows are judged by their masks: where a mask column is missing or wrong, as if not allowed
        free_ok = allow_label_free and len(masks) == 2 and not mask_problems
        label_problems, labels = _check_labels(df["label"].tolist(), source, masks if free_ok else None)
        problems += label_problems
    problems += mask_problems
    if problems:
        raise UserError(problems)
    out = pd.DataFrame({
        "text": df["text"].astype(str).to_numpy(dtype=object),
        "label": _label_series(labels),
        "metric_mask": masks["metric_mask"],
        "classifier_mask": masks["classifier_mask"],
    })
    keep = (out["metric_mask"] == 1) | (out["classifier_mask"] == 1)
    dropped = int((~keep).sum())
    if dropped:
        warn(f"{source}: dropped {dropped} row(s) with both metric_mask and classifier_mask 0 "
             "(they take part in neither loss)", warnings_out)
        out = out[keep].reset_index(drop=True)
    if len(out) == 0:
        raise UserError(f"{source}: no row has metric_mask or classifier_mask set; set 1 in at least one of them")
    return out
