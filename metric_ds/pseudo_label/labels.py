"""The input of pseudo-labelling: a table whose empty labels mark the rows to label, checked and encoded."""
from __future__ import annotations

import numpy as np
import pandas as pd

from metric_ds.errors import UserError, format_rows
from metric_ds.pseudo_label.settings import Settings
from metric_ds.pseudo_label.table import column_clashes


def split_labelled(df: pd.DataFrame, source: str, settings: Settings) -> tuple[np.ndarray, list]:
    """Check the input table and encode its labels.

    A row whose ``label`` is null or empty (whitespace only) is unlabelled. Refused: missing columns, a column
    that pseudo-label writes (:func:`~metric_ds.pseudo_label.table.column_clashes`), bad text,
    no labelled row, no unlabelled row, labels of mixed types, and (kmeans) a class with fewer labelled rows
    than ``min_labelled``, which no cluster could ever give to a row.

    Returns:
        ``(y, classes)``: class id per row (-1 unlabelled), and the classes in sorted order.

    Raises:
        UserError: every problem at once, naming the file, the column, the rows and the fix.
    """
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)}; the table has "
                        f"{', '.join(map(str, df.columns))}. pseudo-label needs text and label (empty for "
                        "unlabelled rows)")
    problems = column_clashes(df, source)
    bad_text = [i for i, t in enumerate(df["text"].tolist()) if not isinstance(t, str) or not t.strip()]
    if bad_text:
        problems.append(f"{source}: column text: null, empty or non-text values in {format_rows(bad_text)}; "
                        "remove those rows or fill in the text")
    raw = df["label"].tolist()
    labelled = np.array([not (v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))
                              or (isinstance(v, str) and not v.strip())) for v in raw])
    values = [int(v) if isinstance(v, (float, np.floating)) and float(v).is_integer() else
              (v.item() if isinstance(v, np.generic) else v) for v, ok in zip(raw, labelled) if ok]
    kinds = {type(v).__name__ for v in values}
    if not labelled.any():
        problems.append(f"{source}: no labelled row (every label is null or empty); label a few rows of each "
                        "class by hand")
    if labelled.all():
        problems.append(f"{source}: no unlabelled row; leave the label of the rows to pseudo-label empty "
                        "(or train on this table directly)")
    if len(kinds) > 1:
        problems.append(f"{source}: column label: labels of mixed types ({', '.join(sorted(kinds))}); use one type")
    if problems:
        raise UserError(problems)
    classes = sorted(set(values))
    ids = {c: i for i, c in enumerate(classes)}
    y = np.full(len(df), -1, dtype=np.int64)
    y[labelled] = [ids[v] for v in values]
    if settings.method == "kmeans":
        counts = np.bincount(y[labelled], minlength=len(classes))
        few = [str(classes[i]) for i in np.flatnonzero(counts < settings.min_labelled)]
        if few:
            raise UserError(f"{source}: class(es) with fewer than --min-labelled = {settings.min_labelled} labelled "
                            f"row(s): {', '.join(few[:10])}{' ...' if len(few) > 10 else ''}; no cluster could "
                            "give them a pseudo-label. Label more rows of those classes, or lower --min-labelled")
    return y, classes
