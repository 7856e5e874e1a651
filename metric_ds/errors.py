"""User-facing errors.

A :class:`UserError` is a mistake in the user's config, data or command line. The CLI prints each of its
messages as an ``error: ...`` line on stderr and exits with status 1, without a traceback (unless
``--debug``). Everything else is a bug or a missing environment piece and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """One or more problems with user input, each message naming the file, key, column or row and the fix.

    Args:
        messages: one message, or several gathered so that the user sees every problem at once.
    """

    def __init__(self, messages: str | Iterable[str]):
        if isinstance(messages, str):
            messages = [messages]
        self.messages: list[str] = [str(m) for m in messages]
        super().__init__("\n".join(self.messages))


class EnvironmentProblem(RuntimeError):
    """A missing piece of the environment (a compiled op, a GPU, an optional package), with the fix."""


# how libraries that do not raise an OSError quote the OS's error number: "[Errno 28] ..." (pyarrow),
# "... (os error 28)" (safetensors, tokenizers)
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]|\(os error (\d+)\)", re.IGNORECASE)


def io_errno(exc: BaseException) -> int | None:
    """The OS's error number of a failed write: the ``OSError``'s, or the one a library's message quotes."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    found = _ERRNO_IN_TEXT.search(str(exc))
    return int(found.group(1) or found.group(2)) if found else None


def describe_io_error(exc: BaseException, where: Path) -> str:
    """A short cause for a failed write: the OS's words (from the error or its text), or the free space where the
    write failed.

    Args:
        exc: what the write raised (an ``OSError``, or a library's own error that quotes the OS's).
        where: the folder written to (or a folder above it), whose free space explains an unspecific error.
    """
    number = io_errno(exc)
    if number is not None:
        return os.strerror(number).lower()
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return (str(exc).splitlines() or [type(exc).__name__])[0]
    if free < 64 * 2**20:
        return os.strerror(errno.ENOSPC).lower()
    return f"the write failed ({(str(exc).splitlines() or [type(exc).__name__])[0][:120]})"


def read_mapping(path: Path, what: str, fmt: str, parse: Callable[[str], Any], parse_errors: type[Exception],
                 fix: str) -> dict[str, Any]:
    """Read a small YAML or JSON file that must hold a mapping; every failure is a :class:`UserError` naming the
    file and ``fix``.

    Args:
        path: the file.
        what: what the file is, for the messages (``"config file"``, ``"evaluation file"``).
        fmt: the format's name (``"YAML"``, ``"JSON"``).
        parse: text to data (``yaml.safe_load``, ``json.loads``).
        parse_errors: what ``parse`` raises on bad text.
        fix: how to make a good file, ending each message.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what} (it does not exist); {fix}")
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except parse_errors as exc:
        raise UserError(f"{path}: not valid {fmt}: {exc}; {fix}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid {fmt} (not UTF-8 text: {exc.reason} at byte {exc.start}); {fix}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}; {fix}")
    return data


def format_rows(rows: Iterable[int], limit: int = 5) -> str:
    """Render row numbers for a message: ``rows 3, 7, 9 and 12 more``.

    Args:
        rows: 0-based row positions; they are shown 1-based as a spreadsheet would number data rows
            (the header is not counted).
        limit: how many to name before summarising the rest.
    """
    rows = [int(r) + 1 for r in rows]
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    word = "row" if len(rows) == 1 else "rows"
    return f"{word} {shown}{more}"
