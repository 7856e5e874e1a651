"""Use a trained model: ``metric_ds.load(path)`` returns a :class:`LoadedModel` that predicts, embeds and votes.

    import metric_ds

    model = metric_ds.load("runs/example/best")       # a run's best/, any export, or the run folder itself
    model.predict(["I lost my card"], top_k=3)         # labels as trained (str or int), probabilities
    model.embed(["I lost my card"])                    # (N, D) float32, the SupCon embedding, unit norm
    bank = model.build_bank(texts, labels)             # a ReferenceSet; or model.bank_from_table(path)
    model.knn(["I lost my card"], bank, k=10)          # majority vote of the 10 nearest bank rows
    model.predict(["what is the weather"], reject=True) # "unknown" below the calibrated threshold (open_set.json)

Every call runs its texts through :func:`metric_ds.encode.encode` (tokenised once, batches of similar length,
outputs in input order, a progress bar for large inputs) on ``device`` (a GPU when there is one), truncating at
the ``max_seq_length`` the model was trained with.

``LoadedModel`` (what ``load`` returns) wraps a :class:`~metric_ds.model.MetricClassifier` (the ``nn.Module``);
``ReferenceSet`` (the labelled texts k-NN votes with) is not training's ring buffer
(:class:`~metric_ds.bank.EmbeddingBank`). The old names ``MetricModel`` and ``Bank`` still import, with a
deprecation warning.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metric_ds.artifact import (
    load_model,
    read_labels,
    read_max_seq_length,
    read_training_table,
    resolve_model_folder,
)
from metric_ds.config import schema_default
from metric_ds.data.io import load_frame
from metric_ds.data.labels import LabelMap
from metric_ds.encode import encode, pick_device
from metric_ds.errors import UserError
from metric_ds.metrics import knn_search, knn_vote
from metric_ds.model import MetricClassifier
from metric_ds.open_set import OPEN_SET_FILE, SCORES, OpenSet
from metric_ds.open_set import read as read_open_set
from metric_ds.open_set import reject as reject_below
from metric_ds.open_set import scores as open_set_scores
from metric_ds.preflight import check_max_seq_length

DEFAULT_BATCH_SIZE = 64
# old name -> new name, importable with a DeprecationWarning
DEPRECATED_NAMES = {"MetricModel": "LoadedModel", "Bank": "ReferenceSet"}


@dataclass
class Predictions:
    """The classifier's output for N texts (in input order) and the k best classes.

    Shape:
        labels: N original labels (``str`` or ``int``, as in ``labels.json``); scores: (N,) the predicted
        label's probability; top_k_labels: N lists of k labels, best first; top_k_scores: (N, k);
        probabilities: (N, C), columns in ``LoadedModel.labels`` order. With ``reject=True``:
        in_scope_scores: (N,) the open-set score (``score_name``); rejected: (N,) bool, the texts whose ``labels``
        entry is the model's unknown label (their ``top_k_labels`` stay the classifier's).
    """

    labels: list[Any]
    scores: np.ndarray
    top_k_labels: list[list[Any]]
    top_k_scores: np.ndarray
    probabilities: np.ndarray
    in_scope_scores: np.ndarray | None = None
    rejected: np.ndarray | None = None
    score_name: str | None = None


@dataclass
class ReferenceSet:
    """Embedded labelled texts to vote with (:meth:`LoadedModel.knn`); formerly ``Bank``.

    Shape:
        z: (N, Dz) unit-norm SupCon embeddings (``distance="cos"``); h: (N, Dh) pooled embeddings
        (``distance="l2"``); label_ids: (N,) ids into ``label_map``, which holds the bank's own labels.
    """

    z: torch.Tensor
    h: torch.Tensor
    label_ids: torch.Tensor
    label_map: LabelMap

    def __len__(self) -> int:
        return int(self.label_ids.numel())


@dataclass
class KnnResult:
    """A k-NN vote for N texts (in input order).

    Shape:
        labels: N voted labels (the bank's); scores: (N,) share of the k neighbours that voted for it;
        neighbours: (N, k) bank rows, nearest first; neighbour_scores: (N, k) cosine similarity (``cos``) or
        minus the Euclidean distance (``l2``).
    """

    labels: list[Any]
    scores: np.ndarray
    neighbours: np.ndarray
    neighbour_scores: np.ndarray


def check_texts(texts: Any, source: str = "texts") -> list[str]:
    """``texts`` as a list of strings (a single string is one text).

    Raises:
        UserError: values that are not strings (e.g. None or NaN), naming their positions (0-based).
    """
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (pd.Series, pd.Index, np.ndarray)):
        texts = texts.tolist()
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        kinds = sorted({type(texts[i]).__name__ for i in bad})
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(f"{source}: {len(bad)} value(s) that are not text ({', '.join(kinds)}) at position(s) "
                        f"{', '.join(map(str, bad[:5]))}{more} (0-based); drop or fill them first")
    return texts


@dataclass(eq=False, repr=False)
class LoadedModel:
    """A loaded model folder: the encoder, its heads, its tokenizer and its labels, on one device (formerly
    ``MetricModel``).

    Args:
        model: the classifier (moved to ``device``, in eval mode).
        tokenizer: its tokenizer.
        label_map: the classifier's labels (``labels.json``).
        max_seq_length: truncation length, in tokens.
        device: where the model runs.
        batch_size: texts per forward pass.
        folder: the model folder it came from.
    """

    model: MetricClassifier
    tokenizer: Any
    label_map: LabelMap
    max_seq_length: int
    device: torch.device
    batch_size: int = DEFAULT_BATCH_SIZE
    folder: Path | None = None

    def __post_init__(self) -> None:
        self.model = self.model.to(self.device).eval()

    @property
    def labels(self) -> list[Any]:
        """The classifier's labels, in column order of :attr:`Predictions.probabilities`."""
        return list(self.label_map.names)

    @property
    def embedding_dim(self) -> int:
        """Size of the SupCon embedding ``z``."""
        return self.model.output_dims()["z"]

    def __repr__(self) -> str:
        return (f"LoadedModel({self.folder}, {self.label_map.num_classes} labels, device={self.device}, "
                f"max_seq_length={self.max_seq_length})")

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, texts: Any, batch_size: int | None = None, show_progress: bool | None = None,
                bar: Any = None, desc: str = "inference") -> dict[str, torch.Tensor]:
        """Run the model over ``texts`` (:func:`metric_ds.encode.encode`); outputs in input order, on the CPU, fp32.

        Args:
            texts: strings.
            batch_size: texts per forward (default: the model's ``batch_size``).
            show_progress: a progress bar; ``None``: from :data:`metric_ds.encode.PROGRESS_MIN_ROWS` texts on.
            bar: an outer progress bar to advance instead (the CLI's, over a whole file).
            desc: the progress bar's label.

        Returns:
            ``logits`` (N, C), ``h`` (N, Dh), ``z`` (N, Dz).
        """
        return encode(self.model, self.tokenizer, check_texts(texts), self.max_seq_length,
                      batch_size or self.batch_size, self.device, show_progress=show_progress, bar=bar,
                      desc=desc)

    # ---------------------------------------------------------------------------------------------- api

    @property
    def open_set(self) -> OpenSet | None:
        """The folder's open-set calibration (:mod:`metric_ds.open_set`), or ``None`` when it has none."""
        if not hasattr(self, "_open_set"):
            found = read_open_set(self.folder) if self.folder is not None else None
            self._open_set = found.to(self.device) if found is not None else None  # moved once, not per call
        return self._open_set

    def require_open_set(self) -> OpenSet:
        """:attr:`open_set`, or a :class:`UserError` saying how to calibrate the model."""
        if self.open_set is None:
            raise UserError(f"{self.folder}: the model is not calibrated for rejection (no {OPEN_SET_FILE}); run "
                            f"metric-ds calibrate --model {self.folder} --data VALIDATION_TABLE")
        return self.open_set

    def in_scope_scores(self, texts: Any, which: Sequence[str] = SCORES, batch_size: int | None = None,
                        show_progress: bool | None = None) -> dict[str, np.ndarray]:
        """How in-scope each text looks, by score (:mod:`metric_ds.open_set`: ``msp``, ``knn``, ``centroid``;
        higher is more in scope); (N,) float32 arrays."""
        calibrated = self.require_open_set()
        out = self.forward(texts, batch_size, show_progress)
        found = open_set_scores(out["logits"], out["z"], calibrated.reference, calibrated.settings.knn_k,
                                tuple(which), self.device)
        return {k: v.numpy() for k, v in found.items()}

    def predict(self, texts: Any, top_k: int = 1, batch_size: int | None = None,
                show_progress: bool | None = None, bar: Any = None, reject: bool = False,
                score: str | None = None) -> Predictions:
        """Classify ``texts``.

        Args:
            texts: strings (a single string is one text).
            top_k: how many classes to list per text, best first (at most the number of classes).
            batch_size, show_progress, bar: see :meth:`forward`.
            reject: answer the model's unknown label (``open_set.json``) for a text whose in-scope score is below
                its calibrated threshold; the scores are in :attr:`Predictions.in_scope_scores`.
            score: ``msp``, ``knn`` or ``centroid`` (with ``reject``); ``None``: the model's default.
        """
        if top_k < 1:
            raise UserError(f"top_k must be >= 1, got {top_k}")
        if reject:
            score, threshold = self.require_open_set().threshold(score)
        out = self.forward(texts, batch_size, show_progress, bar)
        probs = torch.softmax(out["logits"], dim=1)
        k = min(top_k, probs.shape[1])
        scores, ids = probs.topk(k, dim=1)
        names = self.label_map.names
        top_labels = [[names[i] for i in row] for row in ids.tolist()]
        result = Predictions(labels=[row[0] for row in top_labels], scores=scores[:, 0].numpy(),
                             top_k_labels=top_labels, top_k_scores=scores.numpy(), probabilities=probs.numpy())
        if reject:
            calibrated = self.open_set
            values = open_set_scores(out["logits"], out["z"], calibrated.reference, calibrated.settings.knn_k,
                                     (score,), self.device)[score].numpy()
            result.rejected = reject_below(values, threshold)
            result.in_scope_scores, result.score_name = values, score
            unknown = calibrated.settings.unknown_label
            result.labels = [unknown if r else label for label, r in zip(result.labels, result.rejected, strict=True)]
        return result

    def embed(self, texts: Any, normalize: bool = True, which: str = "z", batch_size: int | None = None,
              show_progress: bool | None = None, bar: Any = None) -> np.ndarray:
        """Embed ``texts``.

        Args:
            texts: strings.
            normalize: unit L2 norm per row.
            which: ``"z"``: the SupCon embedding (the projection's output when the model has one, else the
                pooled vector); ``"h"``: the pooled vector the classifier reads.
            batch_size, show_progress, bar: see :meth:`forward`.

        Returns:
            (N, D) float32.
        """
        if which not in ("z", "h"):
            raise UserError(f"which must be 'z' or 'h', got {which!r}")
        out = self.forward(texts, batch_size, show_progress, bar)
        if which == "z" and normalize:
            return out["z"].numpy()  # computed exactly as in training
        vec = out["h"]
        if which == "z" and self.model.projection is not None:
            with torch.inference_mode():
                vec = self.model.projection(vec.to(self.device)).float().cpu()
        if normalize:
            vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec.numpy()

    def build_bank(self, texts: Any, labels: Sequence[Any], batch_size: int | None = None,
                   show_progress: bool | None = None) -> ReferenceSet:
        """Embed labelled texts into a :class:`ReferenceSet` for :meth:`knn` (any labels, not only the
        classifier's)."""
        texts = check_texts(texts)
        labels = list(labels.tolist() if isinstance(labels, (pd.Series, np.ndarray)) else labels)
        if len(labels) != len(texts):
            raise UserError(f"build_bank: {len(texts)} texts but {len(labels)} labels; give one label per text")
        try:
            label_map = LabelMap.from_labels(labels)
        except ValueError as exc:
            raise UserError(f"build_bank: {exc}") from None
        out = self.forward(texts, batch_size, show_progress)
        return ReferenceSet(z=out["z"], h=out["h"], label_ids=torch.from_numpy(label_map.encode(labels)),
                    label_map=label_map)

    def bank_from_table(self, table: Any = None, text_column: str = "text", label_column: str = "label",
                        batch_size: int | None = None, show_progress: bool | None = None) -> ReferenceSet:
        """A :class:`ReferenceSet` of a labelled table's rows (those with ``metric_mask = 1`` if it has that column,
        and a label).

        Args:
            table: a path (Parquet, CSV, JSONL) or a DataFrame; ``None``: the training table recorded in the
                export (``training_data.json``).
            text_column, label_column: the columns to read.
        """
        if table is None:
            table = read_training_table(self.folder) if self.folder is not None else None
            if table is None:
                raise UserError("this export records no training table: pass a table or build_bank(texts, labels)")
        df = load_frame(table)
        source = str(table) if not isinstance(table, pd.DataFrame) else "DataFrame"
        missing = [c for c in (text_column, label_column) if c not in df.columns]
        if missing:
            raise UserError(f"{source}: missing column(s) {', '.join(missing)}; it has {', '.join(map(str, df.columns))}")
        if "metric_mask" in df.columns:
            df = df[df["metric_mask"].astype(str).str.lower().isin(["1", "true", "1.0"])]
        df = df[df[label_column].notna()]  # label-free rows (docs/data.md) vote for no class
        if df.empty:
            raise UserError(f"{source}: no rows for the bank (none with metric_mask = 1 and a label)")
        return self.build_bank(check_texts(df[text_column], f"{source}: column {text_column}"),
                               df[label_column].tolist(), batch_size, show_progress)

    def knn(self, texts: Any, bank: ReferenceSet | None = None, k: int | None = None, distance: str | None = None,
            batch_size: int | None = None, show_progress: bool | None = None, bar: Any = None) -> KnnResult:
        """Label ``texts`` by a majority vote of their ``k`` nearest bank rows.

        The search and the vote are the validation's (:func:`metric_ds.metrics.knn_search`,
        :func:`~metric_ds.metrics.knn_vote`): ties go to the larger summed similarity, then the smaller label.

        Args:
            texts: strings.
            bank: from :meth:`build_bank` or :meth:`bank_from_table`; ``None``: the export's training table.
            k: neighbours that vote (at most the bank's size); ``None``: ``metric_validation.knn_k``'s default.
            distance: ``"cos"`` on ``z`` or ``"l2"`` on ``h``; ``None``: ``metric_validation.distance``'s default.
        """
        k = schema_default("metric_validation.knn_k") if k is None else k
        distance = schema_default("metric_validation.distance") if distance is None else distance
        if distance not in ("cos", "l2"):
            raise UserError(f"distance must be 'cos' or 'l2', got {distance!r}")
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        bank = self.bank_from_table() if bank is None else bank
        if len(bank) == 0:
            raise UserError("the bank is empty: build it from at least one labelled text")
        out = self.forward(texts, batch_size, show_progress, bar)
        key = "z" if distance == "cos" else "h"
        scores, idx = knn_search(out[key].to(self.device), getattr(bank, key), k, distance)
        votes = bank.label_ids.to(self.device)[idx]
        pred = knn_vote(votes, scores) if len(idx) else torch.zeros(0, dtype=torch.long)
        share = (votes == pred[:, None]).double().mean(1) if len(idx) else torch.zeros(0)
        return KnnResult(labels=bank.label_map.decode(pred.tolist()), scores=share.cpu().numpy(),
                         neighbours=idx.cpu().numpy(), neighbour_scores=scores.cpu().numpy())


def load(path: str | Path, device: str | torch.device | None = None, max_seq_length: int | None = None,
         batch_size: int = DEFAULT_BATCH_SIZE) -> LoadedModel:
    """Load a trained model for prediction and embedding.

    Args:
        path: a run's ``best/`` (any folder written by :func:`metric_ds.artifact.save_model`), or the run folder.
        device: ``"cuda"``, ``"cpu"``, ``"cuda:1"``...; default: the GPU when there is one.
        max_seq_length: truncation length; default: the one the model was trained with.
        batch_size: texts per forward pass.

    Raises:
        UserError: ``path`` is not an export or is damaged, or ``max_seq_length`` is not one the encoder can read.
    """
    folder = resolve_model_folder(path)
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    model, tokenizer = load_model(folder)
    if max_seq_length is None:
        max_seq_length = read_max_seq_length(folder)
    else:
        check_max_seq_length(max_seq_length, model.encoder.config, "max_seq_length", str(folder))
    return LoadedModel(model, tokenizer, read_labels(folder), max_seq_length, pick_device(device), batch_size, folder)


def __getattr__(name: str) -> Any:
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        warnings.warn(f"metric_ds.inference.{name} is deprecated: use {new}", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module 'metric_ds.inference' has no attribute {name!r}")
