"""What a user sees on the terminal: short ``warning:``/``error:`` lines, and the guard that turns user errors
into exit status 1 without a traceback.

Every entry point (``metric-ds``, ``python -m metric_ds.train``, ``deepspeed metric_ds/train.py``) runs its work
through :func:`run_guarded`; this module sits below the CLI and the loop so that neither imports the other.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from metric_ds.errors import EnvironmentProblem, UserError

log = logging.getLogger("metric_ds")


def setup_console() -> None:
    """Short ``warning: ...`` lines for our warnings and log messages, instead of file:line noise."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if "metric_ds" in filename or issubclass(category, (UserWarning, FutureWarning)):
            print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    for name in ("transformers", "torch.distributed", "torch.utils.cpp_extension", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed resets its logger's level when it is imported (after us); a filter stays.
    if _errors_only not in logging.getLogger("DeepSpeed").filters:
        logging.getLogger("DeepSpeed").addFilter(_errors_only)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' "Loading weights" / "Writing model shards" bars: \r redraws in log files, once per rank
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if os.environ.get("RANK", "0") not in ("", "0"):
        quiet_other_ranks()


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_other_ranks() -> None:
    """Ranks other than 0 print no warnings and nothing on stdout (rank 0 says the same once); errors still show.

    Libraries print start-up chatter from every process (DeepSpeed's "... built successfully"); in a log file
    each line would appear once per rank.
    """
    log.setLevel(logging.ERROR)
    warnings.showwarning = lambda *args, **kwargs: None
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def run_guarded(fn: Callable[[], Any], debug: bool = False) -> int:
    """Run ``fn``; turn user errors into ``error:`` lines and exit status 1."""
    setup_console()
    try:
        fn()
    except UserError as exc:
        if debug:
            raise
        for message in exc.messages:
            print(f"error: {message}", file=sys.stderr)
        return 1
    except EnvironmentProblem as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` and the launchers' ``--local_rank``: the arguments of every command that reads a
    config (``metric-ds train|validate`` and the ``metric_ds.train`` script)."""
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key (repeatable), e.g. --set training.batch_size=16")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The config arguments plus ``--overwrite`` (``metric-ds train`` and the ``metric_ds.train`` script)."""
    add_config_arguments(p)
    p.add_argument("--overwrite", action="store_true",
                   help="delete a run already in the run folder and start afresh (checkpointing.overwrite)")


def config_from_args(args: argparse.Namespace) -> Any:
    """The validated config that ``--config``, ``--set`` and ``--overwrite`` describe."""
    from metric_ds.config import load_config

    overwrite = ["checkpointing.overwrite=true"] if getattr(args, "overwrite", False) else []
    return load_config(args.config, [*args.overrides, *overwrite])


def apply_local_rank(args: argparse.Namespace) -> None:
    """The deepspeed launcher passes ``--local_rank`` on the command line instead of in the environment."""
    if getattr(args, "local_rank", None) is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
