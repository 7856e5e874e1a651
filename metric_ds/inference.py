"""Use a trained model: ``metric_ds.load(path)`` returns a :class:`MetricModel` that predicts, embeds and votes.

    import metric_ds

    model = metric_ds.load("runs/example/best")       # a run's best/, any export, or the run folder itself
    model.predict(["I lost my card"], top_k=3)         # labels as trained (str or int), probabilities
    model.embed(["I lost my card"])                    # (N, D) float32, the SupCon embedding, unit norm
    bank = model.build_bank(texts, labels)             # or model.bank_from_table("data/train.parquet")
    model.knn(["I lost my card"], bank, k=10)          # majority vote of the 10 nearest bank rows

Every call tokenises its texts once, runs them in batches of similar length (longest first, so padding costs
little; outputs come back in input order), under ``torch.inference_mode`` on ``device`` (a GPU when there is
one), truncating at the ``max_seq_length`` the model was trained with, with a progress bar for large inputs.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from metric_ds.data.collate import Collator, length_sorted_batches
from metric_ds.data.io import load_frame
from metric_ds.data.labels import LabelMap
from metric_ds.errors import UserError
from metric_ds.metrics import knn_search, knn_vote
from metric_ds.model import HEADS_META, MetricClassifier, load_exported
from metric_ds.progress import progress_bar

DEFAULT_BATCH_SIZE = 64
PROGRESS_MIN_ROWS = 1000  # show a progress bar from this many texts on (show_progress=None)
DEFAULT_MAX_SEQ_LENGTH = 128  # training.max_seq_length's default, for exports without their config


@dataclass
class Predictions:
    """The classifier's output for N texts (in input order) and the k best classes.

    Shape:
        labels: N original labels (``str`` or ``int``, as in ``labels.json``); scores: (N,) the predicted
        label's probability; top_k_labels: N lists of k labels, best first; top_k_scores: (N, k);
        probabilities: (N, C), columns in ``MetricModel.labels`` order.
    """

    labels: list[Any]
    scores: np.ndarray
    top_k_labels: list[list[Any]]
    top_k_scores: np.ndarray
    probabilities: np.ndarray


@dataclass
class Bank:
    """Embedded labelled texts to vote with (:meth:`MetricModel.knn`).

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


def resolve_export(path: str | Path) -> Path:
    """The export folder at ``path``: the folder itself, or its ``best/`` (a run folder).

    Raises:
        UserError: ``path`` is missing or holds no export.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model folder; give a run's best/ folder (e.g. runs/example/best)")
    for folder in (path, path / "best"):
        if (folder / HEADS_META).is_file():
            if not (folder / "labels.json").is_file():
                raise UserError(f"{folder}: has no labels.json, so predictions could not be named; "
                                "use a folder written by metric-ds train (a run's best/)")
            return folder
    raise UserError(f"{path} is not a metric_ds export: it has no {HEADS_META} (give a run's best/ folder, "
                    "or the run folder that holds it)")


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


class MetricModel:
    """A loaded export: the encoder, its heads, its tokenizer and its labels, on one device.

    Args:
        model: the classifier in eval mode.
        tokenizer: its tokenizer.
        label_map: the classifier's labels (``labels.json``).
        max_seq_length: truncation length, in tokens.
        device: where the model runs.
        batch_size: texts per forward pass.
        folder: the export it came from.
    """

    def __init__(self, model: MetricClassifier, tokenizer: Any, label_map: LabelMap, max_seq_length: int,
                 device: torch.device, batch_size: int = DEFAULT_BATCH_SIZE, folder: Path | None = None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.label_map = label_map
        self.max_seq_length = max_seq_length
        self.device = device
        self.batch_size = batch_size
        self.folder = folder
        self._collate = Collator(tokenizer)

    @property
    def labels(self) -> list[Any]:
        """The classifier's labels, in column order of :attr:`Predictions.probabilities`."""
        return list(self.label_map.names)

    @property
    def embedding_dim(self) -> int:
        """Size of the SupCon embedding ``z``."""
        proj = self.model.projection
        return proj.out_features if proj is not None else self.model.classifier.in_features

    def __repr__(self) -> str:
        return (f"MetricModel({self.folder}, {self.label_map.num_classes} labels, device={self.device}, "
                f"max_seq_length={self.max_seq_length})")

    # ------------------------------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, texts: Any, batch_size: int | None = None, show_progress: bool | None = None,
                bar: Any = None) -> dict[str, torch.Tensor]:
        """Run the model over ``texts`` in length-sorted batches; outputs in input order, on the CPU, fp32.

        Args:
            texts: strings.
            batch_size: texts per forward (default: the model's ``batch_size``).
            show_progress: a progress bar; ``None``: from :data:`PROGRESS_MIN_ROWS` texts on.
            bar: an outer progress bar to advance instead (the CLI's, over a whole file).

        Returns:
            ``logits`` (N, C), ``h`` (N, Dh), ``z`` (N, Dz).
        """
        texts = check_texts(texts)
        n = len(texts)
        if n == 0:
            c, dh = self.model.classifier.out_features, self.model.classifier.in_features
            return {"logits": torch.zeros(0, c), "h": torch.zeros(0, dh), "z": torch.zeros(0, self.embedding_dim)}
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length, return_attention_mask=False)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        batches = length_sorted_batches([len(ids) for ids in enc["input_ids"]], batch_size or self.batch_size)
        own = bar is None
        if own:
            enabled = n >= PROGRESS_MIN_ROWS if show_progress is None else show_progress
            bar = progress_bar(n, "inference", unit="texts", enabled=enabled)
        out: dict[str, torch.Tensor] = {}
        try:
            for rows in batches:
                batch = self._collate([{**{k: enc[k][i] for k in keys}, "index": i} for i in rows])
                result = self.model(**{k: v.to(self.device) for k, v in batch.items() if k != "index"})
                for name in ("logits", "h", "z"):
                    value = getattr(result, name).float().cpu()
                    if name not in out:
                        out[name] = torch.empty((n, value.shape[1]), dtype=torch.float32)
                    out[name][batch["index"]] = value
                bar.update(len(rows))
        finally:
            if own:
                bar.close()
        return out

    # ---------------------------------------------------------------------------------------------- api

    def predict(self, texts: Any, top_k: int = 1, batch_size: int | None = None,
                show_progress: bool | None = None, bar: Any = None) -> Predictions:
        """Classify ``texts``.

        Args:
            texts: strings (a single string is one text).
            top_k: how many classes to list per text, best first (at most the number of classes).
            batch_size, show_progress, bar: see :meth:`forward`.
        """
        if top_k < 1:
            raise UserError(f"top_k must be >= 1, got {top_k}")
        probs = torch.softmax(self.forward(texts, batch_size, show_progress, bar)["logits"], dim=1)
        k = min(top_k, probs.shape[1])
        scores, ids = probs.topk(k, dim=1)
        names = self.label_map.names
        top_labels = [[names[i] for i in row] for row in ids.tolist()]
        return Predictions(labels=[row[0] for row in top_labels], scores=scores[:, 0].numpy(),
                           top_k_labels=top_labels, top_k_scores=scores.numpy(), probabilities=probs.numpy())

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
                   show_progress: bool | None = None) -> Bank:
        """Embed labelled texts into a :class:`Bank` for :meth:`knn` (any labels, not only the classifier's)."""
        texts = check_texts(texts)
        labels = list(labels.tolist() if isinstance(labels, (pd.Series, np.ndarray)) else labels)
        if len(labels) != len(texts):
            raise UserError(f"build_bank: {len(texts)} texts but {len(labels)} labels; give one label per text")
        try:
            label_map = LabelMap.from_labels(labels)
        except ValueError as exc:
            raise UserError(f"build_bank: {exc}") from None
        out = self.forward(texts, batch_size, show_progress)
        return Bank(z=out["z"], h=out["h"], label_ids=torch.from_numpy(label_map.encode(labels)),
                    label_map=label_map)

    def bank_from_table(self, table: Any = None, text_column: str = "text", label_column: str = "label",
                        batch_size: int | None = None, show_progress: bool | None = None) -> Bank:
        """A :class:`Bank` of a labelled table's rows (those with ``metric_mask = 1`` if it has that column).

        Args:
            table: a path (Parquet, CSV, JSONL) or a DataFrame; ``None``: the training table recorded in the
                export (``training_data.json``).
            text_column, label_column: the columns to read.
        """
        if table is None:
            meta = self.folder / "training_data.json" if self.folder is not None else None
            if meta is None or not meta.is_file():
                raise UserError("this export records no training table: pass a table or build_bank(texts, labels)")
            table = json.loads(meta.read_text())["train"]
        df = load_frame(table)
        source = str(table) if not isinstance(table, pd.DataFrame) else "DataFrame"
        missing = [c for c in (text_column, label_column) if c not in df.columns]
        if missing:
            raise UserError(f"{source}: missing column(s) {', '.join(missing)}; it has {', '.join(map(str, df.columns))}")
        if "metric_mask" in df.columns:
            df = df[df["metric_mask"].astype(str).str.lower().isin(["1", "true", "1.0"])]
        if df.empty:
            raise UserError(f"{source}: no rows for the bank (none with metric_mask = 1)")
        return self.build_bank(check_texts(df[text_column], f"{source}: column {text_column}"),
                               df[label_column].tolist(), batch_size, show_progress)

    def knn(self, texts: Any, bank: Bank | None = None, k: int = 10, distance: str = "cos",
            batch_size: int | None = None, show_progress: bool | None = None, bar: Any = None) -> KnnResult:
        """Label ``texts`` by a majority vote of their ``k`` nearest bank rows.

        The search and the vote are the validation's (:func:`metric_ds.metrics.knn_search`,
        :func:`~metric_ds.metrics.knn_vote`): ties go to the larger summed similarity, then the smaller label.

        Args:
            texts: strings.
            bank: from :meth:`build_bank` or :meth:`bank_from_table`; ``None``: the export's training table.
            k: neighbours that vote (at most the bank's size).
            distance: ``"cos"`` on ``z`` or ``"l2"`` on ``h``.
        """
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


def read_max_seq_length(folder: Path) -> int:
    """``training.max_seq_length`` from the export's ``metric_ds_config.yaml`` (128 when it has none)."""
    path = folder / "metric_ds_config.yaml"
    if not path.is_file():
        return DEFAULT_MAX_SEQ_LENGTH
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return int((cfg.get("training") or {}).get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH)


def load(path: str | Path, device: str | torch.device | None = None, max_seq_length: int | None = None,
         batch_size: int = DEFAULT_BATCH_SIZE) -> MetricModel:
    """Load a trained model for prediction and embedding.

    Args:
        path: a run's ``best/`` (any folder written by :func:`metric_ds.model.export_model`), or the run folder.
        device: ``"cuda"``, ``"cpu"``, ``"cuda:1"``...; default: the GPU when there is one.
        max_seq_length: truncation length; default: the one the model was trained with.
        batch_size: texts per forward pass.

    Raises:
        UserError: ``path`` is not an export.
    """
    folder = resolve_export(path)
    model, tokenizer = load_exported(folder)
    device = default_device() if device is None else torch.device(device)
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    return MetricModel(model, tokenizer, LabelMap.load(folder / "labels.json"),
                       max_seq_length or read_max_seq_length(folder), device, batch_size, folder)
