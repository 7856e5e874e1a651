"""``metric-ds evaluate --model DIR --data F``: score an exported model on any prepared table.

Classification (accuracy, macro-F1, per-class F1, the most confused pairs) on rows with ``classifier_mask``;
retrieval (Recall@K, k-NN accuracy and macro-F1) with the rows with ``metric_mask`` as queries against a bank
built by embedding the model's training file (recorded in the export) or ``--bank-data``. With
``--unknown-label L``, rows of L or of labels the model does not know are out of scope, and each calibrated
in-scope score gets the open-intent metrics (:mod:`metric_ds.open_set`).
"""
from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metric_ds.artifact import (
    load_model,
    read_labels,
    read_max_seq_length,
    read_training_table,
    resolve_model_folder,
)
from metric_ds.config import schema_default, schema_field
from metric_ds.data.io import read_table
from metric_ds.data.labels import LabelMap, unseen_labels
from metric_ds.data.validation import validate_frame
from metric_ds.encode import encode, pick_device
from metric_ds.errors import UserError
from metric_ds.metrics import accuracy, confusion_pairs, macro_f1, per_class_f1, retrieval_metrics
from metric_ds.open_set import OPEN_SET_FILE, SCORES, known_mask, open_set_metrics, scores
from metric_ds.open_set import read as read_open_set
from metric_ds.outputs import write_output_text
from metric_ds.preflight import check_max_seq_length

EVAL_BATCH_SIZE = 128  # texts per forward pass; evaluation keeps no gradients, so this fits


def _encode(df: Any, label_map: LabelMap, source: str, unknown_label: Any = None) -> Any:
    """The table with ``label_id``; with ``unknown_label``, rows of other labels (or of that one) get the id C,
    "unknown", instead of an error."""
    df = df.copy()
    if unknown_label is not None:
        if unknown_label in label_map:
            raise UserError(f"--unknown-label {unknown_label!r} is one of the model's classes; name the out-of-scope "
                            "rows with a label the model does not know")
        known = known_mask(df["label"], label_map, unknown_label)
        df["label_id"] = label_map.num_classes
        df.loc[known, "label_id"] = label_map.encode(df["label"][known])
        return df
    unseen = unseen_labels(df["label"].unique(), label_map, f"{source}: labels unknown to the model")
    if unseen:
        raise UserError(f"{unseen}. Evaluate on data with the model's classes (see labels.json in the model folder), "
                        "or name the out-of-scope rows with --unknown-label")
    df["label_id"] = label_map.encode(df["label"])
    return df


def open_set_results(folder: Path, out: dict[str, torch.Tensor], rows: torch.Tensor, num_classes: int,
                     unknown_label: Any, device: torch.device) -> dict[str, Any]:
    """The open-intent metrics of each calibrated score (:func:`metric_ds.open_set.open_set_metrics`) on ``rows``
    of ``out`` (:func:`embed_table`'s), where label C is "unknown"."""
    calibrated = read_open_set(folder)
    if calibrated is None:
        raise UserError(f"{folder}: --unknown-label scores rejection, but the model is not calibrated (no "
                        f"{OPEN_SET_FILE}); run metric-ds calibrate --model {folder} --data VALIDATION_TABLE first")
    labels, logits, z = out["labels"][rows].cpu(), out["logits"][rows], out["z"][rows]
    known = labels < num_classes
    closed = logits.argmax(1).cpu()
    found: dict[str, Any] = {
        "unknown_label": unknown_label, "known_rows": int(known.sum()), "unknown_rows": int((~known).sum()),
        "default_score": calibrated.settings.score,
        "closed_accuracy_known": float(accuracy(labels[known], closed[known])) if known.any() else None,
        "scores": {}}
    usable = calibrated.usable_scores()
    found["skipped_scores"] = [s for s in SCORES if s not in usable]  # e.g. knn without reference.safetensors
    values = scores(logits, z, calibrated.reference, calibrated.settings.knn_k, tuple(usable), device)
    for name, v in values.items():
        found["scores"][name] = open_set_metrics(v.numpy(), closed.numpy(), labels.numpy(), num_classes,
                                                 calibrated.settings.thresholds[name])
    return found


def embed_table(model: torch.nn.Module, tokenizer: Any, df: Any, max_seq_length: int, batch_size: int,
                device: torch.device | None = None, length_sorted: bool = True) -> dict[str, torch.Tensor]:
    """Run the model over every row of a validated, encoded table (:func:`metric_ds.encode.encode`).

    Args:
        device: where ``model`` is (default: the CPU).
        length_sorted: batch rows of similar length together (less padding; the order is restored).

    Returns:
        on ``device``, in row order: ``logits``, ``h``, ``z``, and the table's ``labels`` (its ``label_id``),
        ``classifier_mask``, ``metric_mask``, ``index`` (0..N-1).
    """
    device = device or torch.device("cpu")
    out = encode(model, tokenizer, df["text"].tolist(), max_seq_length, batch_size, device,
                 length_sorted=length_sorted, show_progress=False, out_device=device)
    rows = {"labels": torch.tensor(df["label_id"].to_numpy(np.int64)), "index": torch.arange(len(df)),
            **{k: torch.tensor(df[k].to_numpy().astype(bool)) for k in ("classifier_mask", "metric_mask")}}
    return {k: v.to(device) for k, v in {**out, **rows}.items()}


def evaluate(model_dir: str | Path, data: str | Path, bank_data: str | Path | None = None,
             batch_size: int = EVAL_BATCH_SIZE, max_seq_length: int | None = None,
             recall_at_k: Sequence[int] | None = None, knn_k: int | None = None, distance: str | None = None,
             device: str | torch.device | None = None, length_sorted: bool = True,
             unknown_label: Any = None) -> dict[str, Any]:
    """Evaluate an export on a table (on ``device``, default the GPU when there is one); returns the JSON-able
    results. ``recall_at_k``, ``knn_k`` and ``distance`` default to ``metric_validation``'s, as in training.

    With ``unknown_label``, rows whose label is not one of the model's classes (or is ``unknown_label``) are
    out of scope: the closed-set metrics count the known rows only, and ``open_set`` holds each calibrated score's
    open-intent metrics over N + 1 classes (:func:`open_set_results`)."""
    recall_at_k = schema_default("metric_validation.recall_at_k") if recall_at_k is None else recall_at_k
    knn_k = schema_default("metric_validation.knn_k") if knn_k is None else knn_k
    distance = schema_default("metric_validation.distance") if distance is None else distance
    model_dir = resolve_model_folder(model_dir)
    if bank_data is not None and not Path(bank_data).is_file():
        raise UserError(f"--bank-data: {bank_data} does not exist; give a prepared table to build the retrieval "
                        "bank from, or leave --bank-data out to use the model's training file")
    device = pick_device(device)
    model, tokenizer = load_model(model_dir)
    model.to(device)
    label_map = read_labels(model_dir)
    if max_seq_length is None:
        max_seq_length = read_max_seq_length(model_dir)
    else:
        check_max_seq_length(max_seq_length, model.encoder.config, "--max-seq-length", str(model_dir))
    df = _encode(validate_frame(read_table(data), str(data)), label_map, str(data), unknown_label)
    out = embed_table(model, tokenizer, df, max_seq_length, batch_size, device, length_sorted)
    names = label_map.names
    # absolute paths: the JSON is read later from other working directories (the report, the study)
    results: dict[str, Any] = {"model": str(model_dir.resolve()), "data": str(Path(data).resolve()), "rows": len(df)}
    known = out["labels"] < len(names)
    if unknown_label is not None:
        results["open_set"] = open_set_results(model_dir, out, out["classifier_mask"].bool(), len(names),
                                               unknown_label, device)
    cm = out["classifier_mask"].bool() & known
    if cm.any():
        y, p = out["labels"][cm], out["logits"][cm].argmax(1)
        results["accuracy"] = float(accuracy(y, p))
        results["macro_f1"] = float(macro_f1(y, p))
        f1s = per_class_f1(y, p, num_classes=len(names))
        results["per_class_f1"] = {str(names[i]): float(f) for i, f in enumerate(f1s.tolist())}
        results["confusion_pairs"] = [[str(names[a]), str(names[b]), int(c)]
                                      for a, b, c in confusion_pairs(y, p, top=20)]
    if bank_data is None:
        bank_data = read_training_table(model_dir)
        if bank_data is not None and not Path(bank_data).is_file():
            warnings.warn(f"retrieval metrics skipped: the model's training file {bank_data} is gone; pass "
                          "--bank-data to build the bank from another table", stacklevel=2)
            bank_data = None
    mm = out["metric_mask"].bool() & known
    if bank_data is not None and Path(bank_data).is_file() and mm.any():
        bank_df = validate_frame(read_table(bank_data), str(bank_data), allow_label_free=True)
        bank_df = _encode(bank_df[bank_df["label"].notna()], label_map, str(bank_data))  # label-free rows vote for none
        bank_out = embed_table(model, tokenizer, bank_df, max_seq_length, batch_size, device, length_sorted)
        bm = bank_out["metric_mask"].bool()
        bank = (bank_out["z"][bm], bank_out["h"][bm], bank_out["labels"][bm])
        results["retrieval"] = retrieval_metrics(out["z"][mm], out["h"][mm], out["labels"][mm], bank,
                                                 recall_at_k=list(recall_at_k), knn_k=knn_k, distance=distance)
        results["bank_data"] = str(bank_data)
    return results


def format_results(results: dict[str, Any]) -> str:
    rows = [("rows", str(results["rows"]))]
    if "accuracy" in results:
        rows += [("accuracy", f"{100 * results['accuracy']:.2f}%"), ("macro-F1", f"{100 * results['macro_f1']:.2f}")]
    for key, value in results.get("retrieval", {}).items():
        rows.append((key, f"{100 * value:.2f}"))
    open_set = results.get("open_set")
    if open_set:
        skipped = f"; {', '.join(open_set['skipped_scores'])} skipped (no reference rows: metric-ds calibrate)" \
            if open_set.get("skipped_scores") else ""
        rows.append(("open set", f"{open_set['known_rows']} known, {open_set['unknown_rows']} unknown rows{skipped}"))
        for name, m in open_set["scores"].items():
            auroc = f", AUROC {100 * m['auroc']:.2f}, FPR@95TPR {100 * m['fpr_at_95_tpr']:.2f}" if "auroc" in m else ""
            rows.append((f"  {name}", f"acc {100 * m['accuracy']:.2f}, macro-F1 {100 * m['macro_f1']:.2f}, "
                                      f"F1 known {100 * m['f1_known']:.2f}, F1 unknown {100 * m['f1_unknown']:.2f}"
                                      f"{auroc}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if results.get("confusion_pairs"):
        lines.append("most confused (true -> predicted: count):")
        lines += [f"  {a} -> {b}: {c}" for a, b, c in results["confusion_pairs"][:5]]
    return "\n".join(lines)


def evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    unknown = None
    if args.unknown_label is not None:
        from metric_ds.commands.calibrate import parse_label

        unknown = parse_label(args.unknown_label, read_labels(resolve_model_folder(args.model)).names)
    results = evaluate(args.model, args.data, args.bank_data, args.batch_size, args.max_seq_length,
                       args.recall_at_k, args.knn_k, args.distance, args.device, unknown_label=unknown)
    output = Path(args.output) if args.output else \
        resolve_model_folder(args.model) / "eval" / f"{Path(args.data).stem}.json"
    write_output_text(output, json.dumps(results, indent=2), what="--output " if args.output else "")
    print(format_results(results))
    print(f"wrote {output}")
    return results


# ---------------------------------------------------------------------------------------------- the parser


def register(sp: argparse.ArgumentParser) -> None:
    """The ``evaluate`` parser; ``--recall-at-k``, ``--knn-k`` and ``--distance`` are ``metric_validation``'s
    (:mod:`metric_ds.config`), as in validation during training."""
    from metric_ds.commands.arguments import add_field_argument

    sp.add_argument("--model", required=True, help="an export folder, e.g. RUN_DIR/best")
    sp.add_argument("--data", required=True, help="a prepared table to evaluate on")
    sp.add_argument("--bank-data", default=None, help="table to build the retrieval bank from "
                    "(default: the model's training file)")
    sp.add_argument("--output", default=None, help="JSON file for the results (default: MODEL/eval/NAME.json)")
    sp.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE)
    sp.add_argument("--max-seq-length", type=int, default=None)
    add_field_argument(sp, "--recall-at-k", schema_field("metric_validation.recall_at_k"))
    add_field_argument(sp, "--knn-k", schema_field("metric_validation.knn_k"))
    add_field_argument(sp, "--distance", schema_field("metric_validation.distance"))
    sp.add_argument("--device", default=None, help="cuda, cpu... (default: the GPU when there is one)")
    sp.add_argument("--unknown-label", default=None, metavar="L",
                    help="score rejection: rows labelled L, or with a label the model does not know, are out of "
                         "scope (needs a calibrated model: metric-ds calibrate)")
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    evaluate_command(args)
