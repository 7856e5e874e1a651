"""A run's folder (``checkpoints_dir/run_name``): checked before training, opened fresh, resumed or overwritten,
its metrics log kept to one history, and ``best/`` swapped in so that a reader never finds it missing.

* A fresh run refuses a folder that already holds a run: re-running a ``run_name`` would mix two runs'
  checkpoints, ``best/`` and records. Resume it (``training.resume_from: latest``) or start it over
  (``checkpointing.overwrite: true``, or ``metric-ds train --overwrite``), which deletes the old run first.
* A resumed run drops the records of ``metrics.jsonl`` past the checkpoint's step, which the interrupted run
  wrote after its last checkpoint and the resumed run writes again.
* ``best/`` is replaced through ``.tmp-best`` (written in full, then marked complete) and ``.old-best``; a kill
  between the two renames is repaired when the folder is next opened or ``best/`` is next loaded.
* ``summary.json`` closes a run (:func:`run_summary`): its steps, best metric and throughput, and every rank's
  digest of its bank and last validation record (:func:`rank_digests`), which must agree. A run resumed after
  it finished reads it back instead of training (:func:`read_summary`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from metric_ds import distributed as D
from metric_ds.checkpoint import write_atomic
from metric_ds.errors import UserError

BEST, TMP_BEST, OLD_BEST = "best", ".tmp-best", ".old-best"
COMPLETE = ".complete"  # written last into .tmp-best: the export is whole
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# What a run leaves in its folder; anything else there (a user's notes) does not make the folder "a run".
RUN_FILES = ("config.yaml", "labels.json", METRICS, SUMMARY, "checkpoints", BEST, TMP_BEST, OLD_BEST)


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
    """Write a new ``best/`` with ``write(folder)`` and swap it in; returns the ``best/`` path.

    When ``write`` or a rename fails, the partial folder is removed, the previous ``best/`` (if any) is left as it
    was, and the error is raised again."""
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
    try:
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
    except OSError:
        if old.is_dir() and not best.exists():
            os.replace(old, best)  # the previous best/ back where it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def rank_digests(bank_rows: Sequence[torch.Tensor] | None, last_val: dict[str, float]) -> list[dict[str, str]]:
    """A hash of the bank's rows (in order) and of the last validation record, from every rank (a collective)."""
    h = hashlib.sha256()
    for t in bank_rows or ():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    mine = {"bank": h.hexdigest()[:16],
            "val": hashlib.sha256(json.dumps(last_val, sort_keys=True).encode()).hexdigest()[:16]}
    if not D.is_dist():
        return [mine]
    out: list = [None] * D.world_size()
    torch.distributed.all_gather_object(out, mine)
    return out


def run_summary(run_dir: Path, save_best_by: str, loop: Any, train_rows: int, wall: float, samples: int,
                digests: list[dict[str, str]]) -> dict[str, Any]:
    """The content of ``summary.json``.

    Args:
        run_dir: the run folder.
        save_best_by: the metric that chose ``best/``.
        loop: the loop state (``best_value``, ``best_step``, ``global_step``, ``samples_seen``).
        train_rows: rows of the training split (``epochs`` counts passes over it).
        wall: seconds this process trained; samples: rows it trained on in that time.
        digests: :func:`rank_digests`.
    """
    return {
        "run_dir": str(run_dir),
        "best_dir": str(Path(run_dir) / BEST),
        "best_metric": f"val/{save_best_by}",
        "best_value": loop.best_value,
        "best_step": loop.best_step,
        "steps": loop.global_step,
        "epochs": round(loop.samples_seen / max(train_rows, 1), 3),  # passes over the train split
        "wall_time_s": wall,
        "train_samples_per_s": samples / max(wall, 1e-9),
        "world_size": D.world_size(),
        # every rank's fingerprint of its bank and last validation metrics: they must agree
        "rank_digests": digests,
        "ranks_agree": len({json.dumps(d, sort_keys=True) for d in digests}) == 1,
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2))


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that finished, or None."""
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None
