"""From a config to train and validation frames: read -> validate -> encode -> split -> balance -> cross-check.

Nothing is written to disk. Every problem found is gathered into one :class:`~metric_ds.errors.UserError`
whose messages name the file or the full config key (``training.batch_size``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from metric_ds.data.balance import balance_indices
from metric_ds.data.io import load_frame
from metric_ds.data.labels import LABEL_FREE, LabelMap, unseen_labels
from metric_ds.data.notices import warn
from metric_ds.data.split import labelled_rows_for_validation, stratified_split
from metric_ds.data.validation import validate_frame
from metric_ds.errors import UserError

if TYPE_CHECKING:
    from metric_ds.config import Config


@dataclass
class TrainingData:
    """Validated splits.

    Attributes:
        train, val: columns ``text``, ``label`` (original), ``label_id`` (0..C-1), ``metric_mask``,
            ``classifier_mask``; index 0..n-1. ``train`` is balanced (``data.upsample``/``data.downsample``).
            Label-free rows (null label, ``label_id`` :data:`~metric_ds.data.labels.LABEL_FREE`) are all in
            ``train``, never balanced; ``val`` holds none.
        label_map: the labels of the training table.
        warnings: what was logged on the way (rows dropped, classes kept out of validation, ...).
    """

    train: pd.DataFrame
    val: pd.DataFrame
    label_map: LabelMap
    warnings: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """A hash of both splits' text, labels and masks, in order: equal exactly when the data are."""
        h = hashlib.sha256()
        for frame in (self.train, self.val):
            cols = frame[["text", "label", "metric_mask", "classifier_mask"]].astype(
                {"label": str, "metric_mask": "int8", "classifier_mask": "int8"})
            h.update(pd.util.hash_pandas_object(cols, index=False).to_numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()[:32]


def _load(obj: str | Path | pd.DataFrame, source: str, problems: list[str], warnings: list[str]
          ) -> pd.DataFrame | None:
    """Read and validate one table; its problems are added to ``problems`` (None is returned then)."""
    try:
        return validate_frame(load_frame(obj), source, warnings, allow_label_free=True)
    except UserError as exc:
        problems.extend(exc.messages)
        return None


def _read_tables(frame: str | Path | pd.DataFrame, val_frame: str | Path | pd.DataFrame | None,
                 warnings: list[str]) -> tuple[pd.DataFrame, pd.DataFrame | None, str, str]:
    """Read and validate the training table and the explicit validation table, if any.

    Returns:
        ``(train frame, validation frame or None, train source, validation source)``; a source names the file
        (or the DataFrame) in messages; without a validation table, the validation source is the training one.

    Raises:
        UserError: every problem of both tables at once.
    """
    problems: list[str] = []
    train_src = str(frame) if not isinstance(frame, pd.DataFrame) else "DataFrame"
    df = _load(frame, train_src, problems, warnings)
    val, val_src = None, train_src
    if val_frame is not None:
        val_src = str(val_frame) if not isinstance(val_frame, pd.DataFrame) else "validation DataFrame"
        val = _load(val_frame, val_src, problems, warnings)
    if df is None or (val_frame is not None and val is None):
        raise UserError(problems)
    if val is not None and val["label"].isna().any():
        free = val["label"].isna()
        warn(f"{val_src}: dropped {int(free.sum())} label-free row(s) (null label) from the validation table: "
             "validation scores labelled rows only", warnings)
        val = val[~free].reset_index(drop=True)
        if len(val) == 0:
            raise UserError(f"{val_src}: the validation table has no labelled row; label some of its rows")
    return df, val, train_src, val_src


def _split_off_validation(df: pd.DataFrame, val_ratio: float, seed: int, best_metric: str | None, train_src: str,
                          warnings: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stratified ``val_ratio`` split of ``df``, keeping labelled validation rows where ``best_metric`` needs
    them; label-free rows all stay in train. Returns ``(train, val)``, each with a fresh index."""
    # Strata are (label, classifier_mask, metric_mask): with 10 hand-labelled rows per class, about 1 goes to
    # validation and 9 stay in train, whatever the other rows do.
    strata = (df["label_id"].to_numpy() * 4 + df["classifier_mask"].to_numpy().astype(np.int64) * 2
              + df["metric_mask"].to_numpy().astype(np.int64))
    labelled = np.flatnonzero(df["label_id"].to_numpy() != LABEL_FREE)  # every row when none is label-free
    train_idx, val_idx = stratified_split(strata[labelled], val_ratio, seed, warnings,
                                          unit="(label, masks) group(s)")
    if len(labelled) < len(df):
        train_idx = np.union1d(labelled[train_idx], np.flatnonzero(df["label_id"].to_numpy() == LABEL_FREE))
        val_idx = labelled[val_idx]
    labelled_train = train_idx[df["classifier_mask"].to_numpy()[train_idx] == 1]
    if best_metric in ("acc", "f1") and len(val_idx) and len(labelled_train) and \
            not (df["classifier_mask"].to_numpy()[val_idx] == 1).any():
        # Few labelled rows per class round to none in validation: move one labelled row from each of
        # some classes, so that save_best_by can be computed.
        moved = labelled_train[labelled_rows_for_validation(df["label_id"].to_numpy()[labelled_train],
                                                            val_ratio, seed)]
        if len(moved):
            train_idx, val_idx = np.setdiff1d(train_idx, moved), np.union1d(val_idx, moved)
            warn(f"{train_src}: the split by data.val_ratio = {val_ratio} left no labelled "
                 f"(classifier_mask = 1) row in validation; {len(moved)} labelled row(s), one per class, moved "
                 f"there so that val/{best_metric} can pick best/", warnings)
    return df.iloc[train_idx].reset_index(drop=True), df.iloc[val_idx].reset_index(drop=True)


def _check_splits(train: pd.DataFrame, val: pd.DataFrame, train_src: str, val_src: str, *, val_ratio: float,
                  batch_size: int, classification_loss_weight: float, metric_loss_weight: float,
                  best_metric: str | None) -> list[str]:
    """The problems of the final splits against the loss weights, the batch size and ``save_best_by``."""
    problems = []
    if classification_loss_weight > 0 and not (train["classifier_mask"] == 1).any():
        problems.append(f"{train_src}: training.classification_loss_weight is {classification_loss_weight} but "
                        "no training row has classifier_mask = 1; set some rows, or set the weight to 0")
    if metric_loss_weight > 0 and not (train["metric_mask"] == 1).any():
        problems.append(f"{train_src}: training.metric_loss_weight is {metric_loss_weight} but no training row "
                        "has metric_mask = 1; set some rows, or set the weight to 0")
    if len(train) < batch_size:
        problems.append(f"{train_src}: the training split has {len(train)} rows, fewer than one batch "
                        f"(training.batch_size = {batch_size}); lower the batch size or add data")
    if best_metric in ("acc", "f1") and len(val) and not (val["classifier_mask"] == 1).any() and \
            (train["classifier_mask"] == 1).any():
        problems.append(f"{val_src}: checkpointing.save_best_by is "
                        f"{best_metric}, which needs labelled (classifier_mask = 1) validation rows, and the "
                        "validation split has none. Add labelled rows (two in a class, to split), give "
                        "data.val_path, or set save_best_by to loss or knn_f1")
    if len(val) == 0:
        problems.append(f"{train_src}: the validation split is empty (every class is too small to split by "
                        f"data.val_ratio = {val_ratio}); raise data.val_ratio or give data.val_path")
    return problems


def _check_pk(train: pd.DataFrame, pk: tuple[int, int], batch_size: int, metric_loss_weight: float, train_src: str,
              warnings: list[str]) -> list[str]:
    """The problems of the pk sampler's ``(classes_per_batch, samples_per_class)`` against the training split."""
    p, k = pk
    problems = []
    if p * k > batch_size:
        problems.append(f"data.classes_per_batch x data.samples_per_class = {p} x {k} = {p * k} exceeds "
                        f"training.batch_size = {batch_size}; lower them or raise the batch size")
    metric = train[(train["metric_mask"] == 1) & (train["label_id"] != LABEL_FREE)]
    counts = metric["label_id"].value_counts()
    usable = int((counts >= 2).sum())
    if metric_loss_weight > 0 and 0 < usable < p:
        warn(f"{train_src}: only {usable} class(es) have >= 2 metric rows in the training split, fewer than "
             f"data.classes_per_batch = {p}; pk batches will repeat classes", warnings)
    return problems


def build_training_data(frame: str | Path | pd.DataFrame, *, val_frame: str | Path | pd.DataFrame | None = None,
                        val_ratio: float = 0.1, seed: int = 0, upsample: int | None = None,
                        downsample: int | None = None, batch_size: int = 1,
                        classification_loss_weight: float = 1.0, metric_loss_weight: float = 1.0,
                        pk: tuple[int, int] | None = None, best_metric: str | None = None) -> TrainingData:
    """Build the splits from explicit settings (see :func:`load_training_data` for the config form).

    Args:
        frame: the training table (path or DataFrame).
        val_frame: an explicit validation table; otherwise a stratified ``val_ratio`` split of ``frame``.
        val_ratio, seed: the split (and the balancing draw).
        upsample, downsample: per-class row bounds for the train split.
        batch_size: the micro-batch size; the train split must hold at least one batch.
        classification_loss_weight, metric_loss_weight: a positive weight needs rows with that mask.
        pk: ``(classes_per_batch, samples_per_class)`` for the pk sampler, or None.
        best_metric: ``checkpointing.save_best_by``; ``acc`` and ``f1`` need labelled validation rows, which the
            split then keeps (or the build fails before training).

    Raises:
        UserError: every problem at once, each with its file or config key.
    """
    warnings: list[str] = []
    df, val, train_src, val_src = _read_tables(frame, val_frame, warnings)

    label_map = LabelMap.from_labels(df["label"].dropna())
    if label_map.num_classes < 2:
        raise UserError(f"{train_src}: the label column holds one class ({label_map.names[0]!r}): the classifier "
                        "and SupCon need at least two. Check the label column")
    df["label_id"] = label_map.encode_or_free(df["label"])
    problems: list[str] = []
    if val is not None:
        unseen = unseen_labels(val["label"], label_map,
                               f"{val_src}: validation labels not in the training data ({train_src})")
        if unseen:
            problems.append(f"{unseen}; the classifier cannot predict them. Remove those rows or add training rows")
        else:
            val["label_id"] = label_map.encode(val["label"])
        train = df
    else:
        train, val = _split_off_validation(df, val_ratio, seed, best_metric, train_src, warnings)
    keep = balance_indices(train["label_id"].to_numpy(), upsample, downsample, seed)
    train = train.iloc[keep].reset_index(drop=True)

    problems += _check_splits(train, val, train_src, val_src, val_ratio=val_ratio, batch_size=batch_size,
                              classification_loss_weight=classification_loss_weight,
                              metric_loss_weight=metric_loss_weight, best_metric=best_metric)
    if pk is not None:
        problems += _check_pk(train, pk, batch_size, metric_loss_weight, train_src, warnings)
    if problems:
        raise UserError(problems)
    return TrainingData(train=train, val=val, label_map=label_map, warnings=warnings)


def load_training_data(cfg: Config, frame: pd.DataFrame | None = None, val_frame: pd.DataFrame | None = None
                       ) -> TrainingData:
    """Build the splits for ``cfg`` (a :class:`metric_ds.config.Config`), or for DataFrames given through the
    Python API in place of ``data.train_path``/``data.val_path``. Writes nothing.

    Raises:
        UserError: every problem of the data against the config, each with its file or key.
    """
    d, t = cfg.data, cfg.training
    val_source = val_frame if val_frame is not None else d.val_path
    return build_training_data(
        frame if frame is not None else d.train_path, val_frame=val_source, val_ratio=d.val_ratio,
        seed=t.seed, upsample=d.upsample, downsample=d.downsample, batch_size=t.batch_size,
        classification_loss_weight=t.classification_loss_weight, metric_loss_weight=t.metric_loss_weight,
        pk=(d.classes_per_batch, d.samples_per_class) if d.sampler == "pk" else None,
        best_metric=cfg.checkpointing.save_best_by,
    )

