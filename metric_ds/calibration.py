"""Calibrate a model folder for open-set prediction: its reference rows, its centroids, and each score's threshold
chosen on known-class validation rows alone (:mod:`metric_ds.open_set`).

The end of training calls :func:`calibrate_best` (the run's validation split against its labelled rows);
``metric-ds calibrate`` calls :func:`calibrate_folder` for any model and table. Rows of the calibration table whose label is not one of
the model's classes (or is the unknown label) are left out and counted: a threshold never sees them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from metric_ds import distributed as D
from metric_ds.errors import UserError
from metric_ds.inference import LoadedModel, check_texts
from metric_ds.open_set import (
    OpenSet,
    OpenSetFile,
    Reference,
    calibrate,
    known_mask,
    save,
    scores,
    stored_centroids,
)

if TYPE_CHECKING:
    from metric_ds.config import Config
    from metric_ds.data.pipeline import TrainingData

log = logging.getLogger("metric_ds")


def reference_rows(table: pd.DataFrame, model: LoadedModel, max_rows: int, seed: int) -> pd.DataFrame:
    """The table's rows the scores compare with: every row of a class the model knows (whatever its masks: a
    hand-checked label and a trusted cluster label both place a class; label-free rows have none), at most
    ``max_rows`` (a seeded draw, in table order)."""
    table = table[known_mask(table["label"], model.label_map)]
    if len(table) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(table), max_rows, replace=False))
        table = table.iloc[keep]
    return table


def calibrate_model(model: LoadedModel, val: pd.DataFrame, reference: pd.DataFrame, *, score: str,
                    reject_rate: float, knn_k: int, unknown_label: Any, max_reference_rows: int,
                    seed: int = 0, sources: tuple[str, str] = ("validation", "reference"),
                    show_progress: bool | None = None) -> OpenSet:
    """Calibrate ``model`` (nothing is written; :func:`metric_ds.open_set.save` writes the result).

    Args:
        model: the loaded model.
        val: columns ``text``, ``label``: the calibration rows; only rows of the model's classes count.
        reference: columns ``text``, ``label``: the rows the knn and centroid scores compare with, normally
            the training table.
        score: the default score written into the file.
        reject_rate, knn_k, unknown_label, max_reference_rows: ``open_set`` settings (:mod:`metric_ds.config`).
        seed: the draw of reference rows when there are more than ``max_reference_rows``.
        sources: how to name ``val`` and ``reference`` in messages and in the file.
        show_progress: progress bars (``None``: for large inputs, :func:`metric_ds.encode.encode`).

    Reference rows whose text is also a calibration row's are left out (counted in the file): each would be its
    own nearest neighbour and raise the knn threshold.

    Raises:
        UserError: ``unknown_label`` is one of the model's labels, or no row of either table is of a known class.
    """
    val_src, ref_src = sources
    if unknown_label in model.label_map:
        raise UserError(f"unknown label {unknown_label!r} is one of the model's classes; pick another "
                        "(open_set.unknown_label, or --unknown-label)")
    known = known_mask(val["label"], model.label_map, unknown_label)
    if not known.any():
        raise UserError(f"{val_src}: no row is of a class the model knows; calibrate on the known classes' "
                        "validation rows")
    texts = check_texts(val["text"][known], f"{val_src}: column text")
    # a calibration text among the reference rows would be its own nearest neighbour (similarity 1): left out
    shared = reference["text"].isin(set(texts))
    ref = reference_rows(reference[~shared], model, max_reference_rows, seed)
    if ref.empty:
        raise UserError(f"{ref_src}: no row of a class the model knows (and not among the calibration rows), to "
                        "compare texts with")
    ref_out = model.forward(check_texts(ref["text"], f"{ref_src}: column text"), desc="reference rows",
                            show_progress=show_progress)
    ref_ids = torch.from_numpy(model.label_map.encode(ref["label"]))
    reference_set = Reference.build(ref_out["z"], ref_ids, model.label_map.num_classes)
    out = model.forward(texts, desc="calibration rows", show_progress=show_progress)
    known_scores = scores(out["logits"], out["z"], reference_set, knn_k, device=model.device)
    settings = OpenSetFile(
        score=score, thresholds=calibrate(known_scores, reject_rate), reject_rate=reject_rate, knn_k=knn_k,
        unknown_label=unknown_label,
        centroids=stored_centroids(reference_set.centroids),
        calibration={"data": val_src, "rows": int(known.sum()), "rows_left_out": int((~known).sum()),
                     "reference": ref_src, "reference_rows": len(ref),
                     "reference_rows_shared_with_data": int(shared.sum()),
                     "max_reference_rows": max_reference_rows, "seed": seed})
    return OpenSet(settings, reference_set)


def calibrate_folder(folder: str | Path, val: pd.DataFrame, reference: pd.DataFrame, settings: Any,
                     device: str | torch.device | None = None, sources: tuple[str, str] = ("validation", "reference"),
                     seed: int = 0, batch_size: int | None = None, show_progress: bool | None = None) -> OpenSet:
    """Load the model folder, calibrate it with ``settings`` (an ``open_set`` config section, or anything with
    its fields) and write ``open_set.json`` and ``reference.safetensors`` into it."""
    from metric_ds.inference import DEFAULT_BATCH_SIZE, load

    model = load(folder, device=device, batch_size=batch_size or DEFAULT_BATCH_SIZE)
    result = calibrate_model(model, val, reference, score=settings.score, reject_rate=settings.reject_rate,
                             knn_k=settings.knn_k, unknown_label=settings.unknown_label,
                             max_reference_rows=settings.max_reference_rows, seed=seed, sources=sources,
                             show_progress=show_progress)
    save(folder, result.settings, result.reference)
    return result


def calibrate_best(folder: Path, data: TrainingData, cfg: Config, device: torch.device) -> None:
    """The end of training: calibrate ``best/`` on the run's validation split against the labelled training rows,
    as ``metric-ds calibrate`` would with the training table, with ``cfg.open_set``. Rank 0 does it while the
    others wait; a failure is a warning saying how to calibrate (the run's model is already exported)."""
    try:
        if D.is_main():
            _calibrate_best(folder, data, cfg, device)
    finally:
        if D.is_dist():
            torch.distributed.barrier()


def _calibrate_best(folder: Path, data: TrainingData, cfg: Config, device: torch.device) -> None:
    # the training rows once each (data.upsample repeats rows, downsample leaves some out) and the validation
    # split's (left out again as calibration rows)
    reference = pd.concat([data.train, data.val]).drop_duplicates(subset=["text", "label"])
    try:
        found = calibrate_folder(folder, data.val, reference, cfg.open_set, device,
                                 ("the validation split", cfg.data.train_path or "the training data"),
                                 cfg.training.seed, show_progress=None if cfg.logging.progress != "off" else False)
    except Exception as exc:  # noqa: BLE001 - the model is trained and exported: never lose the run over this
        log.warning(f"open set: {folder} was not calibrated ({exc}); predict --reject needs it: run metric-ds "
                    f"calibrate --model {folder} --data VALIDATION_TABLE, or set open_set.calibrate: false")
        return
    thresholds = ", ".join(f"{k} {v:.4f}" for k, v in found.settings.thresholds.items())
    tqdm.write(f"open set: calibrated {folder.name}/ on {found.settings.calibration['rows']} validation rows "
               f"(thresholds {thresholds}; default score {found.settings.score})")
