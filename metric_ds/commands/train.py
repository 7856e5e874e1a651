"""``metric-ds train --config F [--set KEY=VALUE ...] [--overwrite]``: train a model from a YAML config.

The same arguments as ``python -m metric_ds.train`` (the script that torchrun and deepspeed launch):
:func:`metric_ds.console.add_train_arguments`.
"""
from __future__ import annotations

import argparse

from metric_ds.console import add_train_arguments, config_from_args


def register(sp: argparse.ArgumentParser) -> None:
    add_train_arguments(sp)
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    from metric_ds.train import train_process

    train_process(config_from_args(args))
