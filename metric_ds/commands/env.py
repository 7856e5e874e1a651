"""``metric-ds env``: versions, and whether the fused SupCon op is built for CPU and CUDA
(:mod:`metric_ds.env_report`)."""
from __future__ import annotations

import argparse


def register(sp: argparse.ArgumentParser) -> None:
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    from metric_ds.env_report import env_report

    print(env_report())
