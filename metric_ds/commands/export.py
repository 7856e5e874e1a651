"""``metric-ds export RUN_OR_MODEL --format st|onnx --output DIR``: a copy of a model for other tools.

``st`` copies the export (encoder, tokenizer, heads, labels, config) and (re)writes its sentence-transformers
files (:mod:`metric_ds.st_layout`); ``onnx`` writes ``model.onnx`` with the tokenizer and labels beside it (see
:mod:`metric_ds.export`).
The output folder appears whole or not at all: it is built beside its destination and renamed into place
(:func:`metric_ds.outputs.atomic_output`); a folder that cannot be written is one ``error:`` line.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from metric_ds.artifact import check_model_folder, resolve_model_folder, write_sentence_transformers
from metric_ds.errors import UserError
from metric_ds.export import export_onnx
from metric_ds.outputs import atomic_output, output_errors

FORMATS = ("st", "onnx")


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: a file of that name exists; give a new folder")
    with output_errors(output, "--output "):
        not_empty = output.is_dir() and any(output.iterdir())
    if not_empty:
        raise UserError(f"--output {output}: the folder exists and is not empty; give a new or empty folder "
                        "(export never overwrites)")


def export(source: str | Path, fmt: str, output: str | Path) -> Path:
    """Export the model in ``source`` (a run folder or an export folder) as ``fmt`` into ``output``.

    Returns:
        the export folder that was read.

    Raises:
        UserError: an unknown format, a source that is not an export, an output folder that is not empty or
            cannot be written.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: unknown export format; use one of {', '.join(FORMATS)}")
    output = Path(output)
    _check_output(output)
    folder = resolve_model_folder(source)
    if fmt == "st":  # onnx loads the folder itself (load_model checks it); st checks a copy, so check the source
        check_model_folder(folder)
    with atomic_output(output, folder=True, what="--output ") as tmp:
        if fmt == "st":
            shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("eval"))
            write_sentence_transformers(tmp, strict=True)
        else:
            diffs = export_onnx(folder, tmp)
            print("ONNX Runtime vs PyTorch, largest difference: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return folder


def export_command(args: argparse.Namespace) -> None:
    folder = export(args.source, args.format, args.output)
    print(f"exported {folder} as {args.format}: {args.output}")


# ---------------------------------------------------------------------------------------------- the parser


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("source", metavar="RUN_OR_MODEL", help="a run folder (its best/ is exported) or an export folder")
    sp.add_argument("--format", required=True, choices=list(FORMATS),
                    help="st: a sentence-transformers folder; onnx: model.onnx with the tokenizer beside it")
    sp.add_argument("--output", required=True, help="a new (or empty) folder")
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    export_command(args)
