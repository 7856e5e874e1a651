"""``metric-ds predict`` and ``metric-ds embed``: run a trained model over a table of any size.

Both read the input in chunks of rows (``--chunk-size``), so a table of millions of rows is never tokenised
at once, and write each chunk as it is done, to a temporary file that becomes the output only at the end: a run
that fails writes nothing. Every input column is kept. Rows whose text is null, empty or blank get a null
prediction (or a NaN embedding) and are reported, never dropped.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from metric_ds.artifact import resolve_model_folder
from metric_ds.data.io import table_format
from metric_ds.data.stream import NpyWriter, TableWriter, iter_chunks, output_format, scan_table
from metric_ds.errors import UserError, format_rows
from metric_ds.inference import LoadedModel, load
from metric_ds.open_set import SCORES
from metric_ds.outputs import atomic_output
from metric_ds.progress import progress_bar

log = logging.getLogger("metric_ds")
DEFAULT_CHUNK_ROWS = 10_000


@dataclass
class Job:
    """A checked command line: input, output and model all usable before any work starts."""

    input: Path
    output: Path
    out_format: str
    rows: int
    model: LoadedModel
    text_column: str
    chunk_rows: int
    empty_rows: list[int] = field(default_factory=list)  # first few, 0-based
    empty_count: int = 0

    def chunks(self) -> Iterator[tuple[pd.DataFrame, np.ndarray, list[str]]]:
        """Each chunk, which of its rows have text, and those texts."""
        start = 0
        for chunk in iter_chunks(self.input, self.chunk_rows):
            values = chunk[self.text_column].tolist()
            ok = np.array([isinstance(t, str) and bool(t.strip()) for t in values], dtype=bool)
            bad = np.flatnonzero(~ok)
            self.empty_count += len(bad)
            self.empty_rows += (bad[: max(0, 5 - len(self.empty_rows))] + start).tolist()
            yield chunk.reset_index(drop=True), ok, [t for t, k in zip(values, ok, strict=True) if k]
            start += len(chunk)

    def report(self, what: str) -> None:
        if self.empty_count:
            more = self.empty_count > len(self.empty_rows)
            rows = format_rows(self.empty_rows) + (f" and {self.empty_count - len(self.empty_rows)} more" if more else "")
            log.warning(f"{self.input}: {self.empty_count} row(s) with null, empty or blank {self.text_column!r} "
                        f"({rows}) got no {what}")
        print(f"wrote {self.output}: {self.rows} rows")


def prepare_job(args: argparse.Namespace, formats: tuple[str, ...]) -> Job:
    """Check everything that can be checked before the model runs (and before anything is written)."""
    inp, out = Path(args.input), Path(args.output)
    table_format(inp)
    out_format = output_format(out, formats)
    if inp.resolve() == out.resolve():
        raise UserError(f"--output {out} is the input file; write to another file")
    if args.batch_size < 1 or args.chunk_size < 1:
        raise UserError(f"--batch-size and --chunk-size must be >= 1, got {args.batch_size} and {args.chunk_size}")
    folder = resolve_model_folder(args.model)
    rows = scan_table(inp, args.text_column)
    model = load(folder, device=args.device, batch_size=args.batch_size)
    return Job(inp, out, out_format, rows, model, args.text_column, args.chunk_size)


def _fill(values: Any, ok: np.ndarray, dtype: Any) -> pd.Series:
    """A column with ``values`` on the rows where ``ok`` and null elsewhere."""
    full = pd.Series(pd.NA, index=range(len(ok)), dtype=dtype)
    full[ok] = pd.Series(list(values), dtype=dtype).to_numpy()
    return full


def predict_command(args: argparse.Namespace) -> None:
    """``metric-ds predict``: add ``pred_label``, ``pred_score`` (and ``topI_label``/``topI_score`` for
    ``--top-k K > 1``, ``knn_label``/``knn_score`` with ``--bank-data``, ``in_scope_score`` with ``--reject``, where
    ``pred_label`` is the model's unknown label for a text below the threshold) to every row of a table."""
    if args.top_k < 1 or args.knn_k < 1:
        raise UserError(f"--top-k and --knn-k must be >= 1, got {args.top_k} and {args.knn_k}")
    job = prepare_job(args, ("parquet", "csv", "jsonl"))
    model = job.model
    label_dtype = "Int64" if model.label_map.to_json()["type"] == "int" else pd.StringDtype()
    bank = model.bank_from_table(args.bank_data) if args.bank_data else None
    if bank is not None:
        knn_dtype = "Int64" if bank.label_map.to_json()["type"] == "int" else pd.StringDtype()
    pred_dtype = label_dtype
    if args.reject:
        model.require_open_set().threshold(args.score)  # calibrated, with that score: before any work
        unknown = model.open_set.settings.unknown_label
        if isinstance(unknown, str) and label_dtype == "Int64":
            pred_dtype = pd.StringDtype()  # int labels and a text unknown label: pred_label holds text
    elif args.score is not None:
        raise UserError("--score chooses the score of --reject; add --reject")
    k = min(args.top_k, model.label_map.num_classes)
    with atomic_output(job.output, what="--output ") as tmp, TableWriter(tmp, job.out_format) as writer, \
            progress_bar(job.rows, "predict", unit="rows") as bar:
        for chunk, ok, texts in job.chunks():
            new: dict[str, pd.Series] = {}
            pred = model.predict(texts, top_k=k, bar=bar, reject=args.reject, score=args.score)
            new["pred_label"] = _fill(pred.labels, ok, pred_dtype)
            new["pred_score"] = _fill(pred.scores, ok, "Float64")
            if args.reject:
                new["in_scope_score"] = _fill(pred.in_scope_scores, ok, "Float64")
            if args.top_k > 1:
                for i in range(k):
                    new[f"top{i + 1}_label"] = _fill([row[i] for row in pred.top_k_labels], ok, label_dtype)
                    new[f"top{i + 1}_score"] = _fill(pred.top_k_scores[:, i], ok, "Float64")
            if bank is not None:
                votes = model.knn(texts, bank, k=args.knn_k, distance=args.distance)
                new["knn_label"] = _fill(votes.labels, ok, knn_dtype)
                new["knn_score"] = _fill(votes.scores, ok, "Float64")
            clash = [c for c in new if c in chunk.columns]
            if clash:
                raise UserError(f"{job.input}: already has column(s) {', '.join(clash)}; rename or drop them")
            writer.write(pd.concat([chunk, pd.DataFrame(new)], axis=1))
            bar.update(int((~ok).sum()))
    job.report("prediction (null in the output)")


def embed_command(args: argparse.Namespace) -> None:
    """``metric-ds embed``: every row's embedding, as an ``embedding`` column beside the input's columns
    (``.parquet``) or as an (N, D) float32 matrix in input order (``.npy``; NaN rows for rows without text)."""
    job = prepare_job(args, ("parquet", "npy"))
    model = job.model
    dim = model.model.output_dims()[args.which]
    with atomic_output(job.output, what="--output ") as tmp, progress_bar(job.rows, "embed", unit="rows") as bar:
        writer = NpyWriter(tmp, job.rows, dim) if job.out_format == "npy" else TableWriter(tmp, "parquet")
        with writer:
            for chunk, ok, texts in job.chunks():
                vectors = np.full((len(chunk), dim), np.nan, dtype=np.float32)
                vectors[ok] = model.embed(texts, normalize=not args.no_normalize, which=args.which, bar=bar)
                if job.out_format == "npy":
                    writer.write(vectors)
                else:
                    if "embedding" in chunk.columns:
                        raise UserError(f"{job.input}: already has a column 'embedding'; rename or drop it")
                    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim,
                                                               mask=pa.array(~ok))
                    writer.write(chunk.assign(embedding=pd.Series(column, dtype=pd.ArrowDtype(column.type))))
                bar.update(int((~ok).sum()))
    job.report("embedding (null in Parquet, NaN in .npy)")


# ---------------------------------------------------------------------------------------------- the parser


def add_inference_arguments(sp: argparse.ArgumentParser, outputs: str) -> None:
    """The arguments that ``predict`` and ``embed`` share; ``outputs`` says which output files there are."""
    from metric_ds.inference import DEFAULT_BATCH_SIZE

    sp.add_argument("--model", required=True, help="a run's best/ folder (or the run folder)")
    sp.add_argument("--input", required=True, help="table of texts (.parquet, .csv or .jsonl); every column is kept")
    sp.add_argument("--output", required=True, help=f"output file ({outputs}), written only when complete")
    sp.add_argument("--text-column", default="text")
    sp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="texts per forward pass")
    sp.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_ROWS,
                    help="rows read, tokenised and written at a time")
    sp.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: the GPU when there is one)")


def register(sp: argparse.ArgumentParser) -> None:
    """The ``predict`` parser; ``--knn-k`` and ``--distance`` are ``metric_validation``'s (:mod:`metric_ds.config`)."""
    from metric_ds.commands.arguments import add_field_argument
    from metric_ds.config import schema_field

    add_inference_arguments(sp, ".parquet, .csv or .jsonl")
    sp.add_argument("--top-k", type=int, default=1, help="also write the K best labels and their probabilities")
    sp.add_argument("--bank-data", default=None, help="labelled table (text, label): add knn_label, a k-NN vote "
                    "(new classes too: add a few labelled rows of a class the model never saw)")
    sp.add_argument("--reject", action="store_true", help="answer the unknown label (open_set.json) for texts whose "
                    "in-scope score is below the calibrated threshold, and add in_scope_score (pred_score stays the "
                    "classifier's probability of its class)")
    sp.add_argument("--score", default=None, choices=list(SCORES),
                    help="the in-scope score of --reject (default: the model's, in open_set.json)")
    add_field_argument(sp, "--knn-k", schema_field("metric_validation.knn_k"))
    add_field_argument(sp, "--distance", schema_field("metric_validation.distance"))
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    predict_command(args)
