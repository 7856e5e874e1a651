"""Reading tables: formats by extension, CSV quirks, and every unreadable-file case naming the file."""
from __future__ import annotations

import json

import pytest
from conftest import BANKING77, make_frame

from metric_ds.data.io import load_frame, read_table, table_format
from metric_ds.data.validation import validate_frame
from metric_ds.errors import UserError

WRITERS = {
    "parquet": lambda df, p: df.to_parquet(p, index=False),
    "pq": lambda df, p: df.to_parquet(p, index=False),
    "csv": lambda df, p: df.to_csv(p, index=False),
    "jsonl": lambda df, p: df.to_json(p, orient="records", lines=True, force_ascii=False),
    "json": lambda df, p: df.to_json(p, orient="records", lines=True, force_ascii=False),
}


@pytest.mark.parametrize("ext", sorted(WRITERS))
@pytest.mark.parametrize("int_labels", [False, True])
def test_round_trip_every_extension(tmp_path, ext, int_labels):
    df = make_frame(30, num_classes=5, seed=1)
    df.loc[3, "text"] = "multi\nline, with \"quotes\" and ünïcödé"
    if int_labels:
        df["label"] = df["label"].str.removeprefix("class_").astype(int) * 10
    df["extra"] = range(len(df))
    path = tmp_path / f"t.{ext}"
    WRITERS[ext](df, path)
    back = validate_frame(read_table(path), str(path))
    assert back["text"].tolist() == df["text"].tolist()
    assert back["label"].tolist() == df["label"].tolist()
    assert all(type(v) is (int if int_labels else str) for v in back["label"].tolist())
    assert list(back.columns) == ["text", "label", "metric_mask", "classifier_mask"]


def test_csv_quirks_crlf_quoted_newlines_bom_and_na_words(tmp_path):
    path = tmp_path / "q.csv"
    rows = ['text,label', '"first\nrow, quoted",a', 'NA,None', 'null,b', '"x\r\ny",a']
    path.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    df = read_table(path)
    assert list(df.columns) == ["text", "label"]  # the byte-order mark is not part of the first name
    assert df["text"].tolist() == ["first\nrow, quoted", "NA", "null", "x\r\ny"]
    assert df["label"].tolist() == ["a", "None", "b", "a"]  # words like NA/None are data, not missing


def test_jsonl_keeps_json_types(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "label": "001"}, {"text": "b", "label": "2"}]))
    assert read_table(path)["label"].tolist() == ["001", "2"]


def test_missing_file_names_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        read_table("sub/nope.csv")
    assert f"{tmp_path / 'sub' / 'nope.csv'}: file not found" in str(info.value)


def test_folder_is_not_a_table(tmp_path):
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(UserError, match="d.parquet: is a folder"):
        read_table(tmp_path / "d.parquet")


@pytest.mark.parametrize("name,content,fmt", [
    ("csv_in_disguise.parquet", b"text,label\nhello,1\n", "PARQUET"),
    ("parquet_in_disguise.csv", None, "CSV"),
    ("csv_in_disguise.jsonl", b"text,label\nhello,1\n", "JSONL"),
    ("latin1.csv", "text,label\ncaf\u00e9,1\n".encode("latin-1"), "CSV"),
])
def test_file_not_what_its_extension_says(tmp_path, name, content, fmt):
    path = tmp_path / name
    if content is None:
        make_frame(5).to_parquet(path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_table(path)
    msg = str(info.value)
    assert f"{path}: could not be read as {fmt}" in msg and f"its extension {path.suffix!r}" in msg


@pytest.mark.parametrize("name,content", [
    ("zero.parquet", ""), ("zero.csv", ""), ("zero.jsonl", ""), ("header_only.csv", "text,label\n"),
    ("blank_lines.jsonl", "\n\n"), ("only_newline.csv", "\n"),
])
def test_empty_file_or_table(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=rf"{name}: (the file is empty|the table has no rows)"):
        read_table(path)


def test_empty_parquet_table(tmp_path):
    path = tmp_path / "none.parquet"
    make_frame(4).iloc[:0].to_parquet(path)
    with pytest.raises(UserError, match="none.parquet: the table has no rows"):
        read_table(path)


@pytest.mark.parametrize("name", ["t.xlsx", "t", "t.tsv"])
def test_unknown_extension_lists_the_allowed(tmp_path, name):
    with pytest.raises(UserError) as info:
        read_table(tmp_path / name)
    msg = str(info.value)
    assert "unknown table extension" in msg and ".csv, .json, .jsonl, .parquet, .pq" in msg
    with pytest.raises(UserError):
        table_format(name)


def test_load_frame_passes_dataframes_through(tmp_path):
    df = make_frame(5)
    assert load_frame(df) is df
    with pytest.raises(UserError, match="DataFrame: the table has no rows"):
        load_frame(df.iloc[:0])
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    assert load_frame(str(path))["text"].tolist() == df["text"].tolist()
    with pytest.raises(TypeError, match="got int"):
        load_frame(3)


@pytest.mark.skipif(not (BANKING77 / "train.csv").is_file(), reason="BANKING77 not beside the repository")
def test_banking77_reads_exactly():
    df = read_table(BANKING77 / "train.csv")
    assert df.shape == (10003, 2) and list(df.columns) == ["text", "category"]
    assert df["category"].nunique() == 77 and df["text"].notna().all()
    assert df["text"].str.contains("\n").any() and not df["text"].str.contains("\r").any()
    assert not df["category"].str.contains(r"\s").any()  # no record-end debris in the last column
