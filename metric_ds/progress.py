"""Progress that reads well on a terminal and in a log file.

On a terminal, a tqdm bar. When stderr is not a terminal (``nohup``, a batch scheduler, ``2> log``), a bar's
``\\r`` redraws would fill the file, so progress is one plain line at most every ``interval`` seconds (and one at
the end)::

    train: 120/633 (19%) 00:41 elapsed, 2.93 it/s, loss=0.4120 lr=4.1e-05

Which one is chosen: the ``METRIC_DS_PROGRESS`` environment variable, else the config's ``logging.progress``,
else ``auto`` (``bar`` on a terminal, ``plain`` otherwise); ``off`` shows nothing. Only rank 0 shows progress.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Literal

from metric_ds.errors import UserError

Mode = Literal["auto", "bar", "plain", "off"]
MODES = ("auto", "bar", "plain", "off")
ENV_VAR = "METRIC_DS_PROGRESS"


def resolve_mode(setting: str | None = None) -> str:
    """``bar``, ``plain`` or ``off``: the environment variable wins over ``setting`` (the config key).

    Raises:
        UserError: an environment variable that names no mode.
    """
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env not in MODES:
        raise UserError(f"{ENV_VAR}={env!r}: must be one of {', '.join(MODES)}")
    mode = env or (setting or "auto")
    if mode == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        mode = "bar" if isatty is not None and isatty() else "plain"
    return mode


def _is_main_rank() -> bool:
    from metric_ds import distributed as D

    return D.is_main() and os.environ.get("RANK", "0") in ("", "0")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class PlainProgress:
    """A tqdm look-alike (``update``, ``set_postfix``, ``close``, context manager) that prints whole lines.

    Args:
        total: the expected count, or ``None`` when unknown.
        desc: the line's prefix.
        initial: the count already done (a resumed run).
        unit: what is counted.
        interval: the least time between two lines, in seconds.
        file: where the lines go (stderr by default).
    """

    def __init__(self, total: int | None = None, desc: str = "", initial: int = 0, unit: str = "it",
                 interval: float = 30.0, file: Any = None):
        self.total, self.desc, self.n, self.unit, self.interval = total, desc, initial, unit, interval
        self.file = file
        self.postfix = ""
        self._initial = initial
        self._start = self._last = time.monotonic()
        self._printed_n: int | None = None

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._print()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._printed_n != self.n:
            self._print()

    def _print(self) -> None:
        now = time.monotonic()
        elapsed = now - self._start
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        post = f", {self.postfix}" if self.postfix else ""
        prefix = f"{self.desc}: " if self.desc else ""
        print(f"{prefix}{done}{pct} {_clock(elapsed)} elapsed, {rate:.3g} {self.unit}/s{post}",
              file=self.file or sys.stderr, flush=True)
        self._last, self._printed_n = now, self.n


class _Off(PlainProgress):
    def _print(self) -> None:
        self._printed_n = self.n


def progress_bar(total: int | None = None, desc: str = "", *, initial: int = 0, unit: str = "it",
                 setting: str | None = None, enabled: bool = True, interval: float = 30.0) -> Any:
    """A progress bar suited to where stderr goes (see the module docstring).

    Args:
        total: the expected count (``None``: unknown).
        desc: a short label (``train``, ``predict``).
        initial: the count already done.
        unit: what is counted (``it``, ``rows``).
        setting: the config's ``logging.progress`` (``auto``, ``bar``, ``plain``, ``off``); the
            ``METRIC_DS_PROGRESS`` environment variable overrides it.
        enabled: ``False`` shows nothing (e.g. an input too small to need a bar); ranks other than 0 never show.
        interval: plain mode: the least seconds between two lines.

    Returns:
        A ``tqdm`` bar, or an object with the same ``update``/``set_postfix``/``close`` methods.
    """
    mode = resolve_mode(setting)
    if not enabled or mode == "off" or not _is_main_rank():
        return _Off(total, desc, initial, unit)
    if mode == "plain":
        return PlainProgress(total, desc, initial, unit, interval)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5)
