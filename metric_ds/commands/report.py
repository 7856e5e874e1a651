"""``metric-ds report RUN_DIR``: plots and an HTML report of a run (see :mod:`metric_ds.report`)."""
from __future__ import annotations

import argparse


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("run_dir", help="the run folder (checkpoints_dir/run_name)")
    sp.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from metric_ds.outputs import output_errors
    from metric_ds.report import build_report

    with output_errors(args.out or Path(args.run_dir) / "report", "--out " if args.out else ""):
        path = build_report(args.run_dir, args.out)
    print(f"report: {path}")
