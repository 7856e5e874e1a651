"""The ``metric-ds`` command: train, validate, prepare, pseudo-label, evaluate, predict, embed, export, report, env.

User errors print ``error: ...`` lines on stderr and exit 1 without a traceback (``--debug`` shows it).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from metric_ds.commands import COMMANDS
from metric_ds.console import apply_local_rank, run_guarded


def build_parser() -> argparse.ArgumentParser:
    """The top parser, with the subparser of every module in :data:`metric_ds.commands.COMMANDS`."""
    p = argparse.ArgumentParser(prog="metric-ds", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"metric_ds.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_local_rank(args)
    return run_guarded(lambda: args.fn(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
