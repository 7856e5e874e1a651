"""`metric-ds predict` and `metric-ds embed`: every input column kept, rows in order, empty texts reported,
tables streamed in chunks, and bad input refused with a clear error and nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_frame

import metric_ds
from metric_ds.cli import main
from metric_ds.inference import LoadedModel

WRITERS = {".parquet": lambda df, p: df.to_parquet(p), ".csv": lambda df, p: df.to_csv(p, index=False),
           ".jsonl": lambda df, p: df.to_json(p, orient="records", lines=True)}


def read(path: Path) -> pd.DataFrame:
    return {".parquet": pd.read_parquet, ".csv": pd.read_csv,
            ".jsonl": lambda p: pd.read_json(p, lines=True)}[path.suffix](path)


@pytest.fixture(scope="module")
def model(tiny_run) -> LoadedModel:
    return metric_ds.load(tiny_run / "best", device="cpu")


def input_frame() -> pd.DataFrame:
    df = make_frame(23, seed=4)[["text"]].assign(id=range(100, 123), note="x")
    df.loc[2, "text"] = "transfer " * 30  # lengths differ, so batches are re-ordered
    df.loc[5, "text"] = "   "
    df.loc[11, "text"] = None
    return df


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("out_ext", [".parquet", ".csv", ".jsonl"])
@pytest.mark.parametrize("in_ext", [".parquet", ".csv", ".jsonl"])
def test_predict_keeps_rows_and_columns(tmp_path, tiny_run, model, capsys, in_ext, out_ext):
    df = input_frame()
    src, out = tmp_path / f"in{in_ext}", tmp_path / f"out{out_ext}"
    WRITERS[in_ext](df, src)
    assert main(["predict", "--model", str(tiny_run / "best"), "--input", str(src), "--output", str(out),
                 "--top-k", "2", "--bank-data", str(tiny_run.parent.parent / "train.parquet"), "--knn-k", "3",
                 "--chunk-size", "4", "--batch-size", "3", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "2 row(s) with null, empty or blank 'text' (rows 6, 12) got no prediction" in err
    got = read(out)
    assert list(got.columns) == ["text", "id", "note", "pred_label", "pred_score", "top1_label", "top1_score",
                                 "top2_label", "top2_score", "knn_label", "knn_score"]
    assert got["id"].astype(int).tolist() == list(range(100, 123))  # CSV columns are read as text
    ok = [i for i in range(23) if i not in (5, 11)]
    assert got.loc[[5, 11], ["pred_label", "pred_score", "knn_label"]].isna().all().all()
    texts = df.loc[ok, "text"].tolist()
    pred = model.predict(texts, top_k=2)
    assert got.loc[ok, "pred_label"].tolist() == pred.labels
    np.testing.assert_allclose(got.loc[ok, "pred_score"].to_numpy(float), pred.scores, atol=1e-5)
    assert got.loc[ok, "top2_label"].tolist() == [row[1] for row in pred.top_k_labels]
    bank = model.bank_from_table()
    assert got.loc[ok, "knn_label"].tolist() == model.knn(texts, bank, k=3).labels
    assert files_in(tmp_path) == {src.name, out.name}


@pytest.mark.parametrize("out_ext", [".npy", ".parquet"])
def test_embed_in_input_order(tmp_path, tiny_run, model, capsys, out_ext):
    df = input_frame()
    src, out = tmp_path / "in.csv", tmp_path / f"emb{out_ext}"
    df.to_csv(src, index=False)
    assert main(["embed", "--model", str(tiny_run), "--input", str(src), "--output", str(out),
                 "--chunk-size", "5", "--device", "cpu"]) == 0
    assert "got no embedding" in capsys.readouterr().err
    ok = [i for i in range(23) if i not in (5, 11)]
    expected = model.embed(df.loc[ok, "text"].tolist())
    if out_ext == ".npy":
        emb = np.load(out)
        assert emb.shape == (23, 16) and emb.dtype == np.float32
        assert np.isnan(emb[[5, 11]]).all()
        np.testing.assert_allclose(emb[ok], expected, atol=1e-5)
    else:
        got = pd.read_parquet(out)
        assert got["id"].astype(int).tolist() == list(range(100, 123)) and got["embedding"].isna().tolist()[5]
        np.testing.assert_allclose(np.stack(got.loc[ok, "embedding"].to_numpy()), expected, atol=1e-5)


def test_embed_h_without_normalising(tmp_path, tiny_run, model):
    src, out = tmp_path / "in.jsonl", tmp_path / "emb.npy"
    make_frame(9).to_json(src, orient="records", lines=True)
    assert main(["embed", "--model", str(tiny_run), "--input", str(src), "--output", str(out), "--which", "h",
                 "--no-normalize", "--device", "cpu"]) == 0
    np.testing.assert_allclose(np.load(out), model.embed(make_frame(9)["text"].tolist(), normalize=False,
                                                         which="h"), atol=1e-5)


def test_tables_are_streamed_in_chunks(tmp_path, tiny_run, monkeypatch):
    seen: list[int] = []
    forward = LoadedModel.forward

    def spy(self, texts, *args, **kwargs):
        seen.append(len(texts))
        return forward(self, texts, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "forward", spy)
    src = tmp_path / "in.parquet"
    make_frame(50).to_parquet(src)
    assert main(["predict", "--model", str(tiny_run), "--input", str(src), "--output", str(tmp_path / "o.csv"),
                 "--chunk-size", "8", "--device", "cpu"]) == 0
    assert seen == [8] * 6 + [2]


NO_TEXT = make_frame(10).rename(columns={"text": "utterance"})
# case -> (input file and its content: a DataFrame, raw text or None for no file; output name; expected message)
BAD = {
    "missing_text_column": ("in.parquet", NO_TEXT, "out.parquet", "no column 'text' (it has utterance, label"),
    "missing_text_column_csv": ("in.csv", NO_TEXT, "out.parquet", "no column 'text' (it has utterance, label"),
    "missing_text_column_jsonl": ("in.jsonl", NO_TEXT, "out.parquet", "no column 'text' (it has utterance"),
    "empty_file": ("in.csv", "", "out.parquet", "the file is empty"),
    "header_only": ("in.csv", "text,label\n", "out.parquet", "the table has no rows"),
    "missing_input": ("in.csv", None, "out.parquet", "file not found"),
    "not_an_export": ("in.csv", make_frame(10), "out.parquet", "neither a metric_ds export"),
    "unknown_input_extension": ("in.xlsx", "x", "out.parquet", "unknown table extension '.xlsx'"),
    "unknown_output_extension": ("in.csv", make_frame(10), "out.txt", "unknown output extension '.txt'"),
    "output_is_input": ("in.parquet", make_frame(10), "in.parquet", "is the input file"),
}


def _bad_case(tmp_path: Path, tiny_run: Path, tiny_model_dir: Path, case: str) -> tuple[list[str], str]:
    name, content, out, expect = BAD[case]
    src = tmp_path / name
    if isinstance(content, pd.DataFrame):
        WRITERS[src.suffix](content, src)
    elif content is not None:
        src.write_text(content)
    model = tiny_model_dir if case == "not_an_export" else tiny_run / "best"
    return ["--model", str(model), "--input", str(src), "--output", str(tmp_path / out), "--device", "cpu"], expect


@pytest.mark.parametrize("command", ["predict", "embed"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_nothing_written(tmp_path, tiny_run, tiny_model_dir, capsys, command, case):
    args, expect = _bad_case(tmp_path, tiny_run, tiny_model_dir, case)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main([command, *args]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and expect in err and "Traceback" not in err, err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing new, nothing changed


def test_a_failure_midway_leaves_nothing(tmp_path, tiny_run, capsys):
    """A column clash is only seen when the first chunk is written: the partial file is removed."""
    src = tmp_path / "in.parquet"
    make_frame(10).assign(pred_label="x").to_parquet(src)
    assert main(["predict", "--model", str(tiny_run), "--input", str(src), "--output", str(tmp_path / "o.parquet"),
                 "--device", "cpu"]) == 1
    assert "already has column(s) pred_label" in capsys.readouterr().err
    assert files_in(tmp_path) == {"in.parquet"}
