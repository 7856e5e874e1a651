"""Open set: how in-scope a text is, a threshold per score chosen without out-of-scope data, and the file that
ships them with a model.

Three scores per text, each higher for a text that looks like the training classes:

- ``msp``: the classifier's maximum softmax probability;
- ``knn``: the mean cosine similarity of the SupCon embedding ``z`` to its ``k`` nearest reference rows (the
  training table's, embedded by the same model), as in deep nearest-neighbour OOD detection (Sun et al. 2022);
- ``centroid``: the cosine similarity of ``z`` to the nearest class centroid of those reference rows.

:func:`calibrate` chooses each score's threshold on known-class validation rows alone: the largest threshold
that rejects at most ``reject_rate`` of them (a text is rejected when its score is *below* the threshold).
:func:`open_set_metrics` scores a threshold on a test set with unknown rows: the standard open-intent metrics.

A calibrated model folder holds two more files (written by :func:`save`, read by :func:`read`):

- ``open_set.json``: the thresholds, the default score, ``knn_k``, the unknown label, and the class centroids
  (lists of floats, in ``labels.json`` order): all that the ``msp`` and ``centroid`` scores need, readable from
  any language (see docs/using-a-model.md for numpy);
- ``reference.safetensors``: the reference rows' embeddings (fp16) and class ids, which the ``knn`` score searches.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from metric_ds.artifact import DAMAGED, read_schema_file
from metric_ds.errors import UserError
from metric_ds.metrics import per_class_f1
from metric_ds.outputs import atomic_output

OPEN_SET_FILE = "open_set.json"
REFERENCE_FILE = "reference.safetensors"
SCORES = ("msp", "knn", "centroid")
Score = Literal["msp", "knn", "centroid"]
CENTROID_DECIMALS = 6
TPR_FOR_FPR = 0.95  # FPR at this share of known rows accepted (FPR@95TPR)


class OpenSetFile(BaseModel):
    """``open_set.json``: what rejecting needs, besides the reference rows of the ``knn`` score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score: Score = Field(description="the default score of predict --reject")
    thresholds: dict[Score, float] = Field(description="reject a text whose score is below its score's threshold")
    reject_rate: float = Field(gt=0, lt=1, description="the share of calibration rows each threshold may reject")
    knn_k: int = Field(gt=0, description="neighbours averaged by the knn score")
    unknown_label: str | int = Field(description="the answer for a rejected text")
    centroids: list[list[float]] = Field(description="unit-norm class centroids of z, in labels.json order")
    calibration: dict[str, Any] = Field(default_factory=dict, description="where the thresholds came from")


@dataclass
class Reference:
    """The reference rows the ``knn`` and ``centroid`` scores compare with.

    Shape:
        z: (M, D) unit-norm embeddings; label_ids: (M,) classifier class ids; centroids: (C, D), unit norm (a
        class without reference rows has a zero centroid: cosine 0 to every text).
    """

    z: torch.Tensor
    label_ids: torch.Tensor
    centroids: torch.Tensor

    @classmethod
    def build(cls, z: torch.Tensor, label_ids: torch.Tensor, num_classes: int) -> Reference:
        """Reference rows ``z`` (stored in fp16: the scores read them back so) and their classes' centroids."""
        z = torch.nn.functional.normalize(z.float(), dim=1).half().float()
        sums = torch.zeros(num_classes, z.shape[1], dtype=torch.float32).index_add_(0, label_ids.long(), z)
        # rounded as open_set.json stores them (decimal floats), so that the calibrated scores are a reader's
        centroids = torch.tensor(stored_centroids(torch.nn.functional.normalize(sums, dim=1)), dtype=torch.float32)
        return cls(z=z, label_ids=label_ids.long(), centroids=centroids)


def stored_centroids(centroids: torch.Tensor) -> list[list[float]]:
    """``centroids`` as ``open_set.json`` stores them: decimal floats of :data:`CENTROID_DECIMALS` places."""
    return [[round(v, CENTROID_DECIMALS) for v in row] for row in centroids.tolist()]


def scores(logits: torch.Tensor, z: torch.Tensor, reference: Reference | None, knn_k: int,
           which: tuple[str, ...] = SCORES, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The in-scope scores of N texts, computed on ``device`` (default: where ``z`` is), returned on the CPU.

    Args:
        logits: (N, C) classifier logits.
        z: (N, D) unit-norm SupCon embeddings.
        reference: the reference rows (needed by ``knn`` and ``centroid``).
        knn_k: neighbours averaged by ``knn``.
        which: the scores wanted.

    Returns:
        (N,) float32 tensors by score name.
    """
    device = device or z.device
    out: dict[str, torch.Tensor] = {}
    if "msp" in which:
        out["msp"] = torch.softmax(logits.to(device).float(), dim=1).max(1).values
    if ("knn" in which or "centroid" in which) and reference is None:
        raise UserError("the knn and centroid scores need the model's reference rows: calibrate the model first "
                        "(metric-ds calibrate)")
    z = z.to(device).float()
    if "knn" in which:
        if len(reference.z) == 0:
            raise UserError(f"the knn score needs the reference rows ({REFERENCE_FILE} of the model folder), which "
                            "are missing: calibrate the model again (metric-ds calibrate), or use another score")
        out["knn"] = knn_mean_similarity(z, reference.z.to(device), knn_k)
    if "centroid" in which:
        out["centroid"] = (z @ reference.centroids.to(device).T).max(1).values if len(z) else \
            torch.zeros(0, device=device)
    return {k: v.float().cpu() for k, v in out.items()}


def knn_mean_similarity(queries: torch.Tensor, database: torch.Tensor, k: int, query_chunk: int = 1024,
                        db_chunk: int = 8192) -> torch.Tensor:
    """The mean cosine similarity of each (unit-norm) query to its ``k`` nearest database rows, in chunks.

    The values alone: unlike :func:`metric_ds.metrics.knn_search`, which a vote needs (indices, ties broken by
    index through a stable sort), a running ``topk`` of the values is enough here, and cheaper.

    Shape:
        queries: (Q, D); database: (N, D); returns (Q,) float32.
    """
    k = min(k, len(database))
    out = []
    for qs in range(0, len(queries), query_chunk):
        q = queries[qs:qs + query_chunk].float()
        best = torch.empty(len(q), 0, device=q.device)
        for ds in range(0, len(database), db_chunk):
            sims = q @ database[ds:ds + db_chunk].float().T
            best = torch.cat([best, sims], dim=1).topk(min(k, best.shape[1] + sims.shape[1]), dim=1).values
        out.append(best.mean(1))
    return torch.cat(out) if out else torch.zeros(0, device=queries.device)


def known_mask(labels: Any, label_map: Any, unknown_label: Any = None) -> np.ndarray:
    """Which of ``labels`` are of a class ``label_map`` knows (and are not ``unknown_label``): the rows a threshold
    may be chosen on, and the known rows of an open-set evaluation."""
    return np.array([v in label_map and v != unknown_label for v in list(labels)], dtype=bool)


def threshold_for(known_scores: torch.Tensor | np.ndarray, reject_rate: float) -> float:
    """The largest threshold that rejects (score < threshold) at most ``reject_rate`` of ``known_scores``.

    Raises:
        UserError: no scores, or a ``reject_rate`` outside (0, 1).
    """
    if not 0 < reject_rate < 1:
        raise UserError(f"reject_rate must be in (0, 1), got {reject_rate}")
    s = np.sort(np.asarray(known_scores, dtype=np.float64))
    if len(s) == 0:
        raise UserError("no known-class rows to calibrate on")
    return float(s[math.floor(reject_rate * len(s) + 1e-9)])


def calibrate(known_scores: dict[str, torch.Tensor], reject_rate: float) -> dict[str, float]:
    """Each score's threshold from the known-class validation rows' scores (:func:`threshold_for`)."""
    return {name: threshold_for(values, reject_rate) for name, values in known_scores.items()}


def reject(values: torch.Tensor | np.ndarray, threshold: float) -> np.ndarray:
    """Which texts to reject: a score below the threshold (a NaN score is rejected too)."""
    values = np.asarray(values, dtype=np.float64)
    return ~(values >= threshold)


# ------------------------------------------------------------------------------------------------ metrics


def open_set_metrics(values: np.ndarray, closed_pred: np.ndarray, labels: np.ndarray, num_classes: int,
                     threshold: float) -> dict[str, float]:
    """The open-intent metrics of one score, known classes ``0..C-1`` and "unknown" as class ``C``.

    Args:
        values: (N,) in-scope scores.
        closed_pred: (N,) the classifier's class (0..C-1) for every row.
        labels: (N,) the true class, ``num_classes`` for unknown rows.
        num_classes: C.
        threshold: reject below it.

    Returns:
        ``accuracy`` and ``macro_f1`` over C + 1 classes, ``f1_known`` (macro over the known classes; both macros
        over the classes present in the labels or the predictions),
        ``f1_unknown``, ``auroc`` (known rows as positives), ``fpr_at_95_tpr`` (share of unknown rows accepted
        by the threshold that accepts 95% of known rows), ``rejected`` (share of rows rejected).
    """
    from sklearn.metrics import roc_auc_score

    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels)
    pred = np.where(reject(values, threshold), num_classes, np.asarray(closed_pred))
    f1 = per_class_f1(torch.as_tensor(labels), torch.as_tensor(pred), num_classes=num_classes + 1).numpy()
    # averaged over the classes present (in the labels or the predictions), as metrics.macro_f1 does
    present = (np.bincount(labels, minlength=num_classes + 1) + np.bincount(pred, minlength=num_classes + 1)) > 0
    known = labels < num_classes
    out = {"accuracy": float((pred == labels).mean()), "macro_f1": float(f1[present].mean()),
           "f1_known": float(f1[:num_classes][present[:num_classes]].mean()) if present[:num_classes].any() else 0.0,
           "f1_unknown": float(f1[num_classes]),
           "rejected": float((pred == num_classes).mean()), "threshold": float(threshold)}
    if known.any() and (~known).any():
        out["auroc"] = float(roc_auc_score(known, values))
        t95 = threshold_for(values[known], 1 - TPR_FOR_FPR)
        out["fpr_at_95_tpr"] = float((values[~known] >= t95).mean())
    return out


# ------------------------------------------------------------------------------------------------ the files


@dataclass
class OpenSet:
    """A model folder's open-set files, loaded: ``settings`` (``open_set.json``) and the reference rows."""

    settings: OpenSetFile
    reference: Reference | None

    def to(self, device: torch.device) -> OpenSet:
        """The same, with the reference rows on ``device``."""
        ref = self.reference
        if ref is None:
            return self
        return OpenSet(self.settings, Reference(ref.z.to(device), ref.label_ids.to(device), ref.centroids.to(device)))

    def usable_scores(self) -> list[str]:
        """The scores this calibration can compute: those with a threshold; ``centroid`` needs the centroids,
        ``knn`` the reference rows."""
        ref = self.reference
        return [s for s in SCORES if s in self.settings.thresholds
                and (s == "msp" or (ref is not None and (s != "knn" or len(ref.z) > 0)))]

    def threshold(self, score: str | None = None) -> tuple[str, float]:
        """``(score, threshold)``: ``score``, or the folder's default."""
        score = score or self.settings.score
        if score not in SCORES:
            raise UserError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        if score not in self.settings.thresholds:
            raise UserError(f"the model was calibrated without the {score} score; calibrate it again "
                            "(metric-ds calibrate)")
        return score, self.settings.thresholds[score]


def save(folder: str | Path, settings: OpenSetFile, reference: Reference | None) -> None:
    """Write ``open_set.json`` (and ``reference.safetensors`` when there are reference rows) into ``folder``."""
    folder = Path(folder)
    if reference is not None:
        with atomic_output(folder / REFERENCE_FILE) as tmp:
            save_file({"z": reference.z.half().contiguous(), "label_ids": reference.label_ids.int().contiguous()},
                      str(tmp))
    with atomic_output(folder / OPEN_SET_FILE) as tmp:  # last: it names the reference rows it was calibrated with
        tmp.write_text(json.dumps(settings.model_dump(), indent=1) + "\n")


def read(folder: str | Path) -> OpenSet | None:
    """A model folder's open-set files, or ``None`` for a folder never calibrated.

    Raises:
        UserError: a damaged ``open_set.json`` or ``reference.safetensors``, naming the file.
    """
    folder = Path(folder)
    if not (folder / OPEN_SET_FILE).is_file():
        return None
    settings = read_schema_file(folder / OPEN_SET_FILE, OpenSetFile)
    centroids = torch.tensor(settings.centroids, dtype=torch.float32)
    reference = None
    path = folder / REFERENCE_FILE
    if path.is_file():
        try:
            held = load_file(str(path))
            reference = Reference(z=held["z"].float(), label_ids=held["label_ids"].long(), centroids=centroids)
        except Exception as exc:  # safetensors raises its own errors for a truncated file
            raise UserError(f"{path}: unreadable ({exc}); {DAMAGED}, or calibrate it again") from None
        rows = settings.calibration.get("reference_rows")
        if rows is not None and rows != len(reference.z):
            raise UserError(f"{path}: holds {len(reference.z)} rows, but {OPEN_SET_FILE} was calibrated with {rows}; "
                            "calibrate the model again (metric-ds calibrate)")
    elif centroids.numel():
        reference = Reference(z=torch.zeros(0, centroids.shape[1]), label_ids=torch.zeros(0, dtype=torch.long),
                              centroids=centroids)
    return OpenSet(settings, reference)
