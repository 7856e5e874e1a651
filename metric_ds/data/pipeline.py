"""From a config to train and validation frames: read -> validate -> encode -> split -> balance -> cross-check."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from metric_ds.config import Config
from metric_ds.data.balance import balance_indices
from metric_ds.data.io import load_frame
from metric_ds.data.labels import LabelMap
from metric_ds.data.split import stratified_split
from metric_ds.data.validation import validate_frame
from metric_ds.errors import UserError


@dataclass
class TrainingData:
    """Validated splits; both frames carry ``label_id`` (0..C-1)."""

    train: pd.DataFrame
    val: pd.DataFrame
    label_map: LabelMap


def _source(obj: object) -> str:
    return obj if isinstance(obj, str) else "DataFrame"


def load_training_data(cfg: Config, frame: pd.DataFrame | None = None, val_frame: pd.DataFrame | None = None
                       ) -> TrainingData:
    """Build the splits for ``cfg`` (or for DataFrames given through the Python API). Writes nothing.

    Raises:
        UserError: every problem of the data against the config, each with its file or key.
    """
    d, t = cfg.data, cfg.training
    train_src = d.parquet_path if frame is None else "DataFrame"
    df = validate_frame(load_frame(d.parquet_path if frame is None else frame), train_src)
    label_map = LabelMap.from_labels(df["label"])
    df["label_id"] = label_map.encode(df["label"])
    problems: list[str] = []
    if d.val_parquet_path is not None or val_frame is not None:
        val_src = d.val_parquet_path if val_frame is None else "DataFrame"
        val = validate_frame(load_frame(d.val_parquet_path if val_frame is None else val_frame), val_src)
        unseen = sorted({v for v in val["label"] if v not in label_map}, key=str)
        if unseen:
            raise UserError(f"{val_src}: validation labels not in the training data ({train_src}): "
                            f"{', '.join(map(str, unseen[:10]))}{' ...' if len(unseen) > 10 else ''}; "
                            "the classifier cannot predict them. Remove those rows or add training rows")
        val["label_id"] = label_map.encode(val["label"])
        train = df
    else:
        train_idx, val_idx = stratified_split(df["label_id"].to_numpy(), d.val_ratio, t.seed)
        train, val = df.iloc[train_idx].reset_index(drop=True), df.iloc[val_idx].reset_index(drop=True)
    keep = balance_indices(train["label_id"].to_numpy(), d.upsample, d.downsample, t.seed)
    train = train.iloc[keep].reset_index(drop=True)

    if t.classification_loss_weight > 0 and not (train["classifier_mask"] == 1).any():
        problems.append(f"{train_src}: training.classification_loss_weight is {t.classification_loss_weight} but "
                        "no training row has classifier_mask = 1; set some rows, or set the weight to 0")
    if t.metric_loss_weight > 0 and not (train["metric_mask"] == 1).any():
        problems.append(f"{train_src}: training.metric_loss_weight is {t.metric_loss_weight} but no training row "
                        "has metric_mask = 1; set some rows, or set the weight to 0")
    if len(train) < t.batch_size:
        problems.append(f"{train_src}: the training split has {len(train)} rows, fewer than one batch "
                        f"(training.batch_size = {t.batch_size}); lower the batch size or add data")
    if len(val) == 0:
        problems.append(f"{train_src}: the validation split is empty; raise data.val_ratio or give "
                        "data.val_parquet_path")
    if problems:
        raise UserError(problems)
    return TrainingData(train=train, val=val, label_map=label_map)
