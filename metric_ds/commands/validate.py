"""``metric-ds validate --config F``: check a config and the dataset it points to, and summarise the data."""
from __future__ import annotations

import argparse

from metric_ds.console import add_config_arguments, config_from_args


def register(sp: argparse.ArgumentParser) -> None:
    add_config_arguments(sp)
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    from metric_ds.data.pipeline import load_training_data
    from metric_ds.data.summary import format_summary, summarize
    from metric_ds.preflight import preflight

    cfg = config_from_args(args)
    preflight(cfg)
    data = load_training_data(cfg)
    print(format_summary(summarize(data, cfg)))
    print("ok: config and data are valid")
