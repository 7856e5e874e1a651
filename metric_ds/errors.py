"""User-facing errors.

A :class:`UserError` is a mistake in the user's config, data or command line. The CLI prints each of its
messages as an ``error: ...`` line on stderr and exits with status 1, without a traceback (unless
``--debug``). Everything else is a bug or a missing environment piece and keeps its traceback.
"""
from __future__ import annotations

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
