"""A run's folder (``checkpoints_dir/run_name``): checked before training, opened fresh, resumed or overwritten,
its metrics log kept to one history, and ``best/`` swapped in so that a reader never finds it missing.

* A fresh run refuses a folder that already holds a run: re-running a ``run_name`` would mix two runs'
  checkpoints, ``best/`` and records. Resume it (``training.resume_from: latest``) or start it over
  (``checkpointing.overwrite: true``, or ``metric-ds train --overwrite``), which deletes the old run first.
* A resumed run drops the records of ``metrics.jsonl`` past the checkpoint's step, which the interrupted run
  wrote after its last checkpoint and the resumed run writes again.
* ``best/`` is replaced through ``.tmp-best`` (written in full, then marked complete) and ``.old-best``; a kill
  between the two renames is repaired when the folder is next opened or ``best/`` is next loaded.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from metric_ds.errors import UserError

BEST, TMP_BEST, OLD_BEST = "best", ".tmp-best", ".old-best"
COMPLETE = ".complete"  # written last into .tmp-best: the export is whole
METRICS = "metrics.jsonl"
# What a run leaves in its folder; anything else there (a user's notes) does not make the folder "a run".
RUN_FILES = ("config.yaml", "labels.json", METRICS, "summary.json", "checkpoints", BEST, TMP_BEST, OLD_BEST)


def writable_problem(path: Path, what: str) -> str | None:
    """Why ``path`` (a folder that may not exist yet) cannot be written, or None.

    Args:
        path: the folder.
        what: the config key that names it, for the message.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{what}: {path} cannot be created: {probe} is a file, not a folder. Choose another folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{what}: {probe} is not writable by this user, so {path} cannot be written. Choose another folder"
    return None


def holds_a_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def repair_best(run_dir: Path) -> None:
    """Finish or undo a ``best/`` swap that a kill interrupted: a complete ``.tmp-best`` wins, else ``.old-best``
    comes back."""
    run_dir = Path(run_dir)
    best, tmp, old = run_dir / BEST, run_dir / TMP_BEST, run_dir / OLD_BEST
    if not best.exists():
        if (tmp / COMPLETE).is_file():
            os.replace(tmp, best)
        elif old.is_dir():
            os.replace(old, best)
    shutil.rmtree(old, ignore_errors=True)
    if tmp.exists() and not (tmp / COMPLETE).is_file():
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in_best(run_dir: Path, write: Callable[[Path], None]) -> Path:
    """Write a new ``best/`` with ``write(folder)`` and swap it in; returns the ``best/`` path."""
    run_dir = Path(run_dir)
    best, tmp, old = run_dir / BEST, run_dir / TMP_BEST, run_dir / OLD_BEST
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        (tmp / COMPLETE).write_text("")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    (best / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)
    return best


def rerun_problem(run_dir: Path, resuming: bool, overwrite: bool) -> str | None:
    """Why a run may not start in ``run_dir`` (it holds another run, neither resumed nor overwritten), or None."""
    if resuming or overwrite or not holds_a_run(run_dir):
        return None
    return (f"run folder {run_dir} already holds a run (checkpoints, best/ or metrics.jsonl). Resume it with "
            "training.resume_from: latest, start it over with checkpointing.overwrite: true (or "
            "metric-ds train --overwrite), which deletes it, or choose another run_name")


def open_fresh(run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a new run: refuse one that holds a run, unless ``overwrite`` deletes it."""
    run_dir = Path(run_dir)
    problem = rerun_problem(run_dir, False, overwrite)
    if problem:
        raise UserError(problem)
    if holds_a_run(run_dir):
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def open_resumed(run_dir: Path, step: int) -> None:
    """Make ``run_dir`` ready to continue from a checkpoint of ``step``: repair ``best/``, and keep the records
    of ``metrics.jsonl`` up to ``step`` (those after it are written again)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    repair_best(run_dir)
    path = run_dir / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f".{METRICS}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
