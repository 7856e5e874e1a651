"""``metric-ds prepare --input T --output P``: convert a CSV/Parquet/JSONL table into metric_ds's format (see
:func:`metric_ds.data.prepare.prepare`)."""
from __future__ import annotations

import argparse

from metric_ds.data.prepare import METRIC_MASK_CHOICES


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--input", required=True, help="input table (.csv, .parquet or .jsonl)")
    sp.add_argument("--output", required=True, help="output table (.parquet, .csv or .jsonl)")
    sp.add_argument("--text-column", default="text")
    sp.add_argument("--label-column", default="label")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--classifier-fraction", type=float, default=None,
                       help="keep classifier_mask=1 on a stratified fraction of rows (limited labelling)")
    group.add_argument("--classifier-per-class", type=int, default=None,
                       help="keep classifier_mask=1 on N rows per class (limited labelling)")
    sp.add_argument("--metric-mask", choices=list(METRIC_MASK_CHOICES), default=METRIC_MASK_CHOICES[0],
                    help="metric_mask=1 on all rows, or only on rows with classifier_mask=1")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    from metric_ds.data.prepare import prepare

    summary = prepare(
        args.input, args.output, text_column=args.text_column, label_column=args.label_column,
        classifier_fraction=args.classifier_fraction, classifier_per_class=args.classifier_per_class,
        metric_mask=args.metric_mask, seed=args.seed,
    )
    print(f"wrote {args.output}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))
