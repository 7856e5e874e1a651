"""``metric-ds pseudo-label --input T --output P [--model M]``: turn a table with a few labelled rows into the
training table of limited labelling.

Labelled rows get ``classifier_mask = 1`` (and ``metric_mask`` by ``--metric-mask``); pseudo-labelled rows get
``classifier_mask = 0, metric_mask = 1``, so that they serve only SupCon; rows that fail the thresholds are left
out and counted, or with ``--keep-unassigned`` kept as label-free rows (an empty label, SupCon only). The summary is printed and, with ``--summary``, written as JSON. Options and input are
checked before any model is loaded, and nothing is written unless every step succeeds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator

from metric_ds.commands.arguments import add_field_argument
from metric_ds.config import schema_field
from metric_ds.data.io import read_table, table_format
from metric_ds.data.prepare import write_table
from metric_ds.outputs import write_output_text
from metric_ds.pseudo_label import (
    Settings,
    embed_texts,
    format_summary,
    load_embedder,
    pseudo_label_frame,
    split_labelled,
)
from metric_ds.pseudo_label.settings import flag

# A round-2 model has trained on the labelled rows that the estimate holds out: they sit nearer their class than
# unseen rows do, and the estimate leans high (measured against gold labels: benchmarks/results/limited_labels.md).
TRAINED_MODEL_CAVEAT = ("optimistic: --model was trained on these labelled rows, so the held-out ones sit nearer "
                        "their class than unlabelled rows do (how far above the true precision on BANKING77: "
                        "benchmarks/results/limited_labels.md)")


# training.max_seq_length's type and bounds (one home); the model's position limit is checked once it is loaded
SEQ_LENGTH = schema_field("training.max_seq_length")
SeqLength = Annotated[(int, *SEQ_LENGTH.metadata)]


class Options(Settings):
    """The command line of ``metric-ds pseudo-label``: the pseudo-labelling settings plus the input, the outputs
    and the embedding. Every field is the flag of the same name; every bad value is reported at once."""

    input: str = Field(description="table with text and label; an empty label marks an unlabelled row")
    output: str = Field(description="the training table to write (.parquet, .csv or .jsonl)")
    model: str | None = Field(None, description="embedding model: a run's best/ folder or an encoder folder "
                                                "(default: the bundled all-MiniLM-L6-v2)")
    summary: str | None = Field(None, description="also write the summary to this JSON file")
    batch_size: int = Field(128, ge=1, description="embedding batch size")
    max_seq_length: SeqLength = Field(SEQ_LENGTH.default, description="embedding truncation length")

    @field_validator("output")
    @classmethod
    def _known_table_format(cls, path: str) -> str:
        table_format(path)  # a UserError naming the path and the formats there are
        return path

    @field_validator("summary")
    @classmethod
    def _json_summary(cls, path: str | None) -> str | None:
        if path is not None and Path(path).suffix.lower() != ".json":
            raise ValueError(f"{path}: give a .json file")
        return path

    def settings(self) -> Settings:
        """The pseudo-labelling settings alone (what the summary records as ``thresholds``)."""
        return Settings(**self.thresholds())


# the flags in the order ``--help`` lists them
FLAGS = ("input", "output", "model", *Settings.model_fields, "summary", "batch_size", "max_seq_length")


def pseudo_label(options: Options, device: str | None = None) -> dict[str, Any]:
    """Read, embed, pseudo-label, write. See :mod:`metric_ds.pseudo_label` for the methods.

    Returns:
        The summary.

    Raises:
        UserError: an unreadable or unusable input table, a model that cannot be loaded, or a
            ``--max-seq-length`` beyond its positions; nothing is written then. (Bad options are refused earlier,
            when ``options`` is made.)
    """
    from metric_ds.preflight import check_max_seq_length

    settings = options.settings()
    df = read_table(options.input)
    y, classes = split_labelled(df, options.input, settings)
    embedder = load_embedder(options.model)
    check_max_seq_length(options.max_seq_length, embedder.encoder_config, flag("max_seq_length"),
                         options.model or "bundled all-MiniLM-L6-v2")
    x = embed_texts(embedder, df["text"].tolist(), options.batch_size, options.max_seq_length, device)
    table, summary = pseudo_label_frame(df, x, y, classes, settings)
    summary["model"] = "bundled all-MiniLM-L6-v2" if options.model is None else options.model
    if embedder.kind == "export":
        summary["estimated_precision"]["caveat"] = TRAINED_MODEL_CAVEAT
    summary["input"], summary["output"] = options.input, options.output
    write_table(table, options.output)
    if options.summary is not None:
        write_output_text(options.summary, json.dumps(summary, indent=2), what="--summary ")
    return summary


def register(sp: argparse.ArgumentParser) -> None:
    """The ``pseudo-label`` parser: every flag, its type, choices, default and help, read from :class:`Options`."""
    for name in FLAGS:
        field = Options.model_fields[name]
        add_field_argument(sp, flag(name), field, help=field.description)
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    options = Options(**{name: getattr(args, name) for name in FLAGS})
    summary = pseudo_label(options)
    print(format_summary(summary))
    print(f"wrote {options.output}" + (f" and {options.summary}" if options.summary else ""))
    return summary
