"""The ``metric-ds`` command: train, validate, prepare, pseudo-label, evaluate, predict, embed, export, report, env.

User errors print ``error: ...`` lines on stderr and exit 1 without a traceback (``--debug`` shows it).

Only the module of the command being run is imported (and with it torch, pandas...): ``metric-ds --help`` and
``metric-ds env`` start in well under a second, and a broken install of a heavy package cannot stop the commands
that do not need it.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence

from metric_ds.commands import COMMANDS, module_name
from metric_ds.console import apply_local_rank, run_guarded


def build_parser(full: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The top parser: every command of :data:`metric_ds.commands.COMMANDS` with its help line, and the arguments of
    the commands in ``full`` (``None``: all of them) from their modules' ``register``."""
    full = set(COMMANDS) if full is None else set(full)
    p = argparse.ArgumentParser(prog="metric-ds", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_line in COMMANDS.items():
        sp = sub.add_parser(name, help=help_line)
        if name in full:
            importlib.import_module(module_name(name)).register(sp)
    return p


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand that ``argv`` names: its first argument that is not an option of the top parser."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(full=[c for c in [_command(argv)] if c in COMMANDS]).parse_args(argv)
    apply_local_rank(args)
    return run_guarded(lambda: args.fn(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
