"""Reading tables: Parquet, CSV or JSONL chosen by extension, or a pandas DataFrame passed through."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from metric_ds.errors import UserError

READERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def table_format(path: str | Path) -> str:
    """The format named by ``path``'s extension.

    Raises:
        UserError: for an extension we do not read.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in READERS:
        raise UserError(f"{path}: unknown table extension {suffix or '(none)'!r}; use one of "
                        f"{', '.join(sorted(READERS))}")
    return READERS[suffix]


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table; errors name the file and say what is wrong with it.

    CSV is read with a real CSV parser (quoted fields may hold newlines; CRLF record ends are fine); every
    column is read as written (labels that look like numbers stay numbers).
    """
    path = Path(path)
    fmt = table_format(path)
    if not path.exists():
        raise UserError(f"{path.resolve()}: file not found; check the path (data.parquet_path or --input)")
    if path.is_dir():
        raise UserError(f"{path.resolve()}: is a folder, not a table file")
    try:
        if fmt == "parquet":
            df = pd.read_parquet(path)
        elif fmt == "csv":
            df = pd.read_csv(path, keep_default_na=True, encoding="utf-8")
        else:
            df = pd.read_json(path, lines=True)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty") from None
    except Exception as exc:  # noqa: BLE001 - every parser error means "not what the extension says"
        raise UserError(f"{path}: could not be read as {fmt.upper()} (the format its extension "
                        f"{path.suffix!r} names): {type(exc).__name__}: {str(exc)[:200]}") from None
    if len(df) == 0:
        raise UserError(f"{path}: the table has no rows")
    return df


def load_frame(obj: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A DataFrame as is, or the table at a path."""
    if isinstance(obj, pd.DataFrame):
        if len(obj) == 0:
            raise UserError("the DataFrame has no rows")
        return obj
    return read_table(obj)
