"""``metric-ds embed --model M --input T --output F``: every row's embedding, beside the input's columns
(``.parquet``) or as a matrix (``.npy``); the work is :func:`metric_ds.commands.predict.embed_command`."""
from __future__ import annotations

import argparse

from metric_ds.commands.predict import add_inference_arguments, embed_command


def register(sp: argparse.ArgumentParser) -> None:
    add_inference_arguments(sp, ".parquet: an embedding column beside the input's; .npy: an N x D matrix")
    sp.add_argument("--which", choices=["z", "h"], default="z",
                    help="z: the SupCon embedding; h: the pooled vector the classifier reads")
    sp.add_argument("--no-normalize", action="store_true", help="keep the vectors' norms")
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    embed_command(args)
