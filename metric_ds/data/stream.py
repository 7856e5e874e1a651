"""Tables too large for memory: read in chunks of rows, written chunk by chunk, published only when complete.

Reading keeps every column. Parquet columns keep their Arrow types; CSV columns are read as text (a CSV has
no types, and ``"001"`` stays ``"001"``); JSON Lines values keep their JSON types. The writers write to the
hidden partial of :func:`metric_ds.outputs.atomic_output`, renamed over the target at the end, so a failed run
leaves nothing behind.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from metric_ds.data.io import check_file, table_format
from metric_ds.errors import UserError

WRITE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".npy": "npy"}


def output_format(path: str | Path, allowed: tuple[str, ...]) -> str:
    """The format named by an output path's extension, if it is one of ``allowed``.

    Raises:
        UserError: an extension outside ``allowed`` (the message lists them).
    """
    suffix = Path(path).suffix.lower()
    fmt = WRITE_FORMATS.get(suffix)
    if fmt not in allowed:
        exts = sorted(s for s, f in WRITE_FORMATS.items() if f in allowed)
        raise UserError(f"{path}: unknown output extension {suffix or '(none)'!r}; use one of {', '.join(exts)}")
    return fmt


def _chunks(path: Path, fmt: str, chunk_rows: int, columns: list[str] | None) -> Iterator[pd.DataFrame]:
    if fmt == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=columns):
            yield pa.Table.from_batches([batch]).to_pandas(types_mapper=pd.ArrowDtype)
    elif fmt == "csv":
        with pd.read_csv(path, chunksize=chunk_rows, encoding="utf-8-sig", dtype=str, keep_default_na=False,
                         na_values=[""], usecols=columns) as reader:
            yield from reader
    else:
        with pd.read_json(path, lines=True, chunksize=chunk_rows, dtype=False, convert_dates=False,
                          encoding="utf-8") as reader:
            for df in reader:
                yield df if columns is None else df[[c for c in columns if c in df.columns]]


def iter_chunks(path: str | Path, chunk_rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """The table at ``path`` as DataFrames of at most ``chunk_rows`` rows, in order.

    Args:
        path: a ``.parquet``, ``.csv`` or ``.jsonl`` file.
        chunk_rows: rows per chunk.
        columns: read only these (all by default).

    Raises:
        UserError: a missing or empty file, or one that is not what its extension says.
    """
    path = Path(path)
    fmt = table_format(path)
    check_file(path)
    try:
        yield from _chunks(path, fmt, chunk_rows, columns)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty") from None
    except (UserError, GeneratorExit):
        raise
    except Exception as exc:  # noqa: BLE001 - every parser error means "not what the extension says"
        raise UserError(f"{path}: could not be read as {fmt.upper()} (the format its extension "
                        f"{path.suffix!r} names): {type(exc).__name__}: {str(exc)[:200]}") from None


def scan_table(path: str | Path, column: str, chunk_rows: int = 100_000) -> int:
    """Rows of the table at ``path``, checking that it has ``column`` (one cheap pass, one column read).

    Raises:
        UserError: no such column, no rows, or any problem :func:`iter_chunks` reports.
    """
    path = Path(path)
    fmt = table_format(path)
    check_file(path)
    if fmt == "parquet":
        try:
            meta = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{path}: could not be read as PARQUET: {type(exc).__name__}: {str(exc)[:200]}") from None
        names, rows = meta.schema_arrow.names, meta.metadata.num_rows
    else:
        names, rows = None, 0
        for chunk in iter_chunks(path, chunk_rows):
            names = names if names is not None else list(chunk.columns)
            if column not in chunk.columns:
                break
            rows += len(chunk)
        names = names or []
    if column not in names:
        raise UserError(f"{path}: no column {column!r} (it has {', '.join(map(str, names)) or 'no columns'}); "
                        "name the text column with --text-column")
    if rows == 0:
        raise UserError(f"{path}: the table has no rows")
    return rows


class TableWriter:
    """Appends DataFrames to a Parquet, CSV or JSON Lines file.

    Parquet takes its schema from the first chunk (columns that are all null there become strings); later
    chunks are cast to it.

    Args:
        path: the file (written from scratch).
        fmt: ``parquet``, ``csv`` or ``jsonl``.
    """

    def __init__(self, path: str | Path, fmt: str):
        self.path, self.fmt = Path(path), fmt
        self._parquet: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, df: pd.DataFrame) -> None:
        if self.fmt == "parquet":
            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._parquet is None:
                schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f
                                    for f in table.schema]).remove_metadata()
                self._parquet, self._schema = pq.ParquetWriter(self.path, schema), schema
            try:
                table = table.cast(self._schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                raise UserError(f"rows {self._rows + 1}-{self._rows + len(df)}: their column types differ from the "
                                f"first rows' ({str(exc)[:200]}); convert the input to Parquet first") from None
            self._parquet.write_table(table)
        elif self.fmt == "csv":
            df.to_csv(self.path, mode="a", header=self._rows == 0, index=False, encoding="utf-8")
        else:
            with open(self.path, "a", encoding="utf-8") as fh:
                df.to_json(fh, orient="records", lines=True, force_ascii=False)
        self._rows += len(df)

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        elif self._rows == 0:
            self.path.touch()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        _close(self, exc_type is not None)


class NpyWriter:
    """Fills a ``.npy`` matrix of known shape chunk by chunk, without holding it in memory.

    ``numpy.lib.format.open_memmap`` writes the header and sizes the file; rows are then written with plain
    file writes, so the process's memory does not grow with the file.

    Args:
        path: the file.
        rows, dim: the matrix's shape.
    """

    def __init__(self, path: str | Path, rows: int, dim: int, dtype: Any = np.float32):
        self.dtype = np.dtype(dtype)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=(rows, dim))
        self.offset, self.row_bytes, self.rows = mm.offset, dim * self.dtype.itemsize, rows
        del mm
        self._fh = open(path, "r+b")  # noqa: SIM115 - closed in close()
        self._next = 0

    def write(self, block: np.ndarray) -> None:
        if self._next + len(block) > self.rows:
            raise ValueError(f"NpyWriter: {self._next + len(block)} rows written into a matrix of {self.rows}")
        self._fh.seek(self.offset + self._next * self.row_bytes)
        self._fh.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self._next += len(block)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        _close(self, exc_type is not None)


def _close(writer: TableWriter | NpyWriter, failed: bool) -> None:
    """Close ``writer``; after a failure, an error of the close itself (a full disk again) is not a second one."""
    try:
        writer.close()
    except OSError:
        if not failed:
            raise
