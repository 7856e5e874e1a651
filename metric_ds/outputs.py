"""What a command writes: whole or not at all, never left behind by a kill, and a failure is one ``error:`` line.

Every output (``predict``, ``embed``, ``pseudo-label``, ``prepare`` and ``evaluate`` files, ``export`` folders) is
written through :func:`atomic_output`: to a hidden partial beside its target, ``.NAME.partial-PID.EXT``, renamed
over the target only when complete. A run that fails removes its partial; a killed run cannot, so the next run
into the same folder removes the partials of processes that are no longer alive (:func:`remove_stale_partials`).
A failed write (a read-only or full disk, an immutable or busy folder) is a :class:`~metric_ds.errors.UserError`
that names the output and the cause (:func:`output_errors`).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from metric_ds.errors import UserError, describe_io_error, io_errno

# a partial of this module (".pred.partial-123.parquet", ".export.partial-123"), or of write_table before it used
# this module (".out.csv.123.tmp"); the group is the writer's process id
PARTIAL_NAMES = (re.compile(r"^\..+\.partial-(\d+)(\.[^.]+)?$"),
                 re.compile(r"^\..+\.(?:parquet|pq|csv|jsonl|json)\.(\d+)\.tmp$"))  # only a table's: not any .tmp

_FIXES = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write to a writable folder",
    errno.EACCES: "write to a folder you may write to",
    errno.EPERM: "write to a folder you may write to (is it or its parent immutable? see lsattr)",
    errno.EBUSY: "it is in use (a mount point?); write to a new folder inside it",
}


def io_fix(exc: BaseException) -> str:
    """What to do about a failed write, by its cause."""
    return _FIXES.get(io_errno(exc) or 0, "check the folder and the disk")


def partial_path(path: Path) -> Path:
    """The hidden partial that this process writes ``path`` to: ``.NAME.partial-PID.EXT`` beside it."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts; pid 0 or less: yes, unknown)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists; anything else: do not guess
        return True
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass  # cleaning is best effort: what could not be removed is tried again next time


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the partials in ``folder`` (see :data:`PARTIAL_NAMES`) whose writer is no longer alive: a killed
    ``predict``, ``embed``, ``pseudo-label`` or ``export``. Returns what was found stale."""
    stale = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return stale
    for entry in entries:
        found = next((m for m in (p.match(entry.name) for p in PARTIAL_NAMES) if m), None)
        if found and not pid_alive(int(found.group(1))):
            _remove(entry)
            stale.append(entry)
    return stale


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


@contextmanager
def output_errors(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn an ``OSError`` of the block into a :class:`~metric_ds.errors.UserError` naming ``path`` (the output the
    user asked for, not a partial), the cause and the fix.

    Args:
        path: the output.
        what: how the user named it (``"--output "``), put before the path.
    """
    path = Path(path)
    try:
        yield
    except OSError as exc:
        cause = describe_io_error(exc, _nearest_existing(path.absolute()))
        raise UserError(f"could not write {what}{path}: {cause}; {io_fix(exc)}") from None


@contextmanager
def atomic_output(path: str | Path, *, folder: bool = False, what: str = "") -> Iterator[Path]:
    """A hidden partial path beside ``path``, renamed to ``path`` when the block succeeds and removed when it fails.

    Stale partials of dead processes in the same folder are removed first; an ``OSError`` (of the block too) is a
    :class:`~metric_ds.errors.UserError` (:func:`output_errors`).

    Args:
        path: the output file, or with ``folder`` an output folder (absent or empty: the caller checks).
        folder: the block writes a folder at the partial path, not a file.
        what: how the user named the output (``"--output "``), for messages.
    """
    path = Path(path)
    if not folder and path.is_dir():
        raise UserError(f"{what}{path}: is a folder; give an output file name")
    tmp = partial_path(path)
    with output_errors(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent)
        try:
            yield tmp
            os.replace(tmp, path)  # a folder replaces an empty folder
        finally:
            _remove(tmp)


def write_output_text(path: str | Path, text: str, what: str = "") -> None:
    """Write a small text file (a JSON summary) atomically, with :func:`atomic_output`'s errors."""
    with atomic_output(path, what=what) as tmp:
        tmp.write_text(text, encoding="utf-8")
