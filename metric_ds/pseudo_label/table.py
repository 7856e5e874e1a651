"""The output of pseudo-labelling: the training table that ``metric-ds train`` reads as it is.

Every input column is kept, values and dtypes unchanged (row ids trace a pseudo-label back to its row), except
``label``, filled in on the pseudo-labelled rows. Labelled rows get ``classifier_mask = 1`` (and
``metric_mask = 1``); pseudo-labelled rows get ``classifier_mask = 0, metric_mask = 1``, so that they serve only
SupCon; ``source`` (``labelled``/``pseudo``) and ``confidence`` columns say where each label came from. The rows
that could not be pseudo-labelled are left out, or with ``--keep-unassigned`` kept as label-free rows (label null,
``metric_mask = 1``, ``classifier_mask = 0``, ``source = unassigned``, ``confidence`` null), which SupCon trains
each as its own class with a second view of itself (``docs/data.md``). The
input's own ``metric_mask`` and ``classifier_mask`` (a table from ``metric-ds prepare`` has them) are replaced:
deciding which rows serve which loss is what pseudo-label does. An input that already has ``source`` or
``confidence`` is refused (:func:`column_clashes`), as ``predict`` refuses one named like its outputs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from metric_ds.pseudo_label.assign import Assignment
from metric_ds.pseudo_label.settings import Settings

# the columns pseudo-label adds after the input's own, in this order; the masks replace the input's own
MASKS = ("metric_mask", "classifier_mask")
WRITTEN_COLUMNS = (*MASKS, "source", "confidence")


def column_clashes(df: pd.DataFrame, source: str) -> list[str]:
    """The problem (none or one) of an input table that has a column pseudo-label writes and would not replace
    (``source``, ``confidence``)."""
    clash = [c for c in WRITTEN_COLUMNS if c in df.columns and c not in MASKS]
    if not clash:
        return []
    return [f"{source}: already has column(s) {', '.join(clash)}, which pseudo-label writes; rename or drop them"]


def repeat_labelled(table: pd.DataFrame, share: float) -> tuple[pd.DataFrame, int]:
    """Repeat the labelled rows (``classifier_mask = 1``) r times so that they make up about ``share`` of the
    table: every random batch then holds labelled rows and the classifier gets enough updates, while SupCon
    still sees every pseudo-labelled row once per epoch.

    Returns:
        ``(table, r)``: the labelled rows r times (r >= 1), then the other rows.
    """
    lab = table[table["classifier_mask"] == 1]
    rest = table[table["classifier_mask"] != 1]
    r = max(1, round(share * len(rest) / ((1 - share) * len(lab)))) if len(lab) else 1
    return pd.concat([lab] * r + [rest], ignore_index=True), r


def _rows(df: pd.DataFrame, rows: np.ndarray, labels: np.ndarray, classifier_mask: int, source: str,
          confidence: float | np.ndarray) -> pd.DataFrame:
    """``df``'s ``rows`` with their ``labels`` and the :data:`WRITTEN_COLUMNS` (``metric_mask`` is 1)."""
    part = df.iloc[rows].reset_index(drop=True)
    part["label"] = labels
    return part.assign(metric_mask=1, classifier_mask=classifier_mask, source=source, confidence=confidence)


def output_table(df: pd.DataFrame, y: np.ndarray, result: Assignment, classes: list,
                 settings: Settings) -> tuple[pd.DataFrame, dict[str, int]]:
    """The training table: labelled rows first (``settings.labelled_share`` repeating them, see
    :func:`repeat_labelled`), then pseudo-labelled rows, then (``settings.keep_unassigned``) the unassigned rows as
    label-free rows, each in input order.

    Args:
        df: the input table (``text``, ``label`` and any other columns), N rows.
        y: class id per row, -1 for unlabelled, shape (N,).
        result: the pseudo-labels of the unlabelled rows.
        classes: class names by id.
        settings: ``metric_mask`` (``labelled`` leaves the pseudo-labelled rows out), ``labelled_share`` and
            ``keep_unassigned``.

    Returns:
        ``(table, counts)``: the table (every column of ``df`` in its order, ``label`` filled in, then
        ``metric_mask``, ``classifier_mask``, ``source``, ``confidence``) and the summary's counts of what it holds
        (``written``, ``pseudo_written``, ``unassigned_written``, ``labelled_repeat``, ``left_out_by_metric_mask``).
    """
    lab, pseudo = np.flatnonzero(y >= 0), np.flatnonzero(result.labels >= 0)
    names = np.array(classes, dtype=object)
    df = df.drop(columns=[c for c in MASKS if c in df.columns])  # replaced, and written after the input's columns
    parts = [_rows(df, lab, names[y[lab]], 1, "labelled", 1.0)]
    if settings.metric_mask == "labelled":
        # as in `prepare --metric-mask labelled`: SupCon on the labelled rows only, so a pseudo-labelled row
        # would take part in neither loss and is left out
        left_out, pseudo_written = len(pseudo), 0
    else:
        parts.append(_rows(df, pseudo, names[result.labels[pseudo]], 0, "pseudo", result.confidence[pseudo]))
        left_out, pseudo_written = 0, len(pseudo)
    unassigned = np.flatnonzero((y < 0) & (result.labels < 0)) if settings.keep_unassigned else np.zeros(0, int)
    if len(unassigned):  # label-free rows: SupCon with a second view of themselves, never CE
        parts.append(_rows(df, unassigned, np.full(len(unassigned), None, dtype=object), 0, "unassigned", np.nan))
    table = pd.concat(parts, ignore_index=True)
    repeat = 1
    if settings.labelled_share is not None:
        table, repeat = repeat_labelled(table, settings.labelled_share)
    if all(isinstance(c, int) for c in classes):
        table["label"] = table["label"].astype("Int64" if len(unassigned) else "int64")
    return table, {"written": len(table), "pseudo_written": pseudo_written, "unassigned_written": len(unassigned),
                   "labelled_repeat": repeat, "left_out_by_metric_mask": left_out}
