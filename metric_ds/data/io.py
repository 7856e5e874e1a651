"""Reading tables: Parquet, CSV or JSONL chosen by extension, or a pandas DataFrame passed through."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from metric_ds.errors import UserError

READERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
_HINTS = {
    "parquet": "",
    "csv": "; a CSV must be UTF-8 text with a header row",
    "jsonl": "; expected JSON Lines: one JSON object per line",
}


def table_format(path: str | Path) -> str:
    """The format named by ``path``'s extension: ``parquet``, ``csv`` or ``jsonl``.

    Raises:
        UserError: for an extension we do not read (the message lists those we do).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in READERS:
        raise UserError(f"{path}: unknown table extension {suffix or '(none)'!r}; use one of "
                        f"{', '.join(sorted(READERS))}")
    return READERS[suffix]


def check_file(path: Path) -> None:
    """Raise a :class:`UserError` unless ``path`` is an existing, non-empty file."""
    if not path.exists():
        raise UserError(f"{path.resolve()}: file not found; check the path (data.train_path, "
                        "data.val_path or --input)")
    if path.is_dir():
        raise UserError(f"{path.resolve()}: is a folder, not a table file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table; errors name the file and say what is wrong with it.

    CSV is read as UTF-8 (a byte-order mark is skipped) with a real CSV parser: quoted fields may hold
    newlines and CRLF record ends are fine. Only an empty CSV field is missing; words such as ``NA`` or
    ``null`` stay text. JSON Lines values keep their JSON types (``"001"`` stays a string). Labels that look
    like numbers in a CSV are read as numbers.

    Args:
        path: a ``.parquet``/``.pq``, ``.csv`` or ``.jsonl``/``.json`` (JSON Lines) file.

    Returns:
        The table as read, every column kept.

    Raises:
        UserError: unknown extension, missing file, an empty file or table, or a file that is not what its
            extension says.
    """
    path = Path(path)
    fmt = table_format(path)
    check_file(path)
    try:
        if fmt == "parquet":
            df = pd.read_parquet(path)
        elif fmt == "csv":
            df = pd.read_csv(path, encoding="utf-8-sig", keep_default_na=False, na_values=[""])
        else:
            df = pd.read_json(path, lines=True, dtype=False, convert_dates=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty") from None
    except Exception as exc:  # noqa: BLE001 - every parser error means "not what the extension says"
        raise UserError(f"{path}: could not be read as {fmt.upper()} (the format its extension "
                        f"{path.suffix!r} names){_HINTS[fmt]}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if len(df) == 0:
        raise UserError(f"{path}: the table has no rows")
    return df


def load_frame(obj: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A DataFrame as is (the Python API), or the table at a path (see :func:`read_table`).

    Raises:
        UserError: an empty DataFrame, or any problem :func:`read_table` reports.
    """
    if isinstance(obj, pd.DataFrame):
        if len(obj) == 0:
            raise UserError("DataFrame: the table has no rows")
        return obj
    if not isinstance(obj, (str, Path)):
        raise TypeError(f"expected a path or a pandas DataFrame, got {type(obj).__name__}")
    return read_table(obj)
