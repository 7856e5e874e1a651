"""Exports for other tools: sentence-transformers parity (1e-5) and ONNX Runtime parity (1e-4) on tiny random
BERTs, the ``metric-ds export`` command on run and export folders, its refusals, and the README's code blocks."""
from __future__ import annotations

import errno
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tmpfs

from metric_ds.artifact import load_model, save_model
from metric_ds.cli import main
from metric_ds.data.labels import LabelMap
from metric_ds.errors import EnvironmentProblem
from metric_ds.export import ONNX_FILE, require
from metric_ds.model import MetricClassifier

REPO = Path(__file__).resolve().parent.parent
MAX_LEN = 16
LABELS = ["card_lost", "refund", "top_up", "transfer"]
# a long text that is truncated at MAX_LEN, a one-word text, and one in between: the batch is padded
TEXTS = ["I lost my card yesterday " * 8, "refund", "How do I top up by bank transfer?", "exchange rate fee"]


def make_export(out: Path, model_dir: Path, pooling: str = "mean", projection_dim: int | None = None) -> Path:
    """An export of the tiny random encoder with random heads, as training writes it (labels and config too)."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(1)
    model = MetricClassifier(AutoModel.from_pretrained(model_dir), len(LABELS), pooling, projection_dim).eval()
    save_model(out, model, AutoTokenizer.from_pretrained(model_dir), label_map=LabelMap(LABELS),
               config={"training": {"max_seq_length": MAX_LEN}})
    return out


def reference(folder: Path, texts: list[str] = TEXTS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """metric_ds's own (logits, h, z) of ``texts`` with the export's model, truncated at MAX_LEN."""
    model, tokenizer = load_model(folder)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    return out.logits, out.h, out.z


def ort_outputs(onnx_dir: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """What a service without metric_ds computes: the tokenizer beside the graph, then ONNX Runtime."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    session = ort.InferenceSession(str(onnx_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
    logits, embedding = session.run(["logits", "embedding"], {i.name: batch[i.name] for i in session.get_inputs()})
    return {"logits": logits, "embedding": embedding}


@pytest.mark.parametrize("projection_dim", [None, 8])
@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_sentence_transformers_gives_z(tmp_path, tiny_model_dir, pooling, projection_dim):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    best = make_export(tmp_path / "best", tiny_model_dir, pooling, projection_dim)
    modules = [m["name"] for m in json.loads((best / "modules.json").read_text())]
    assert modules == ["transformer", "pooling", *(["pooler"] if pooling == "pooler" else []),
                       *(["projection"] if projection_dim else []), "normalize"]
    st = SentenceTransformer(str(best), device="cpu")
    assert st.max_seq_length == MAX_LEN
    _, _, z = reference(best)
    got = st.encode(TEXTS, convert_to_tensor=True)
    assert got.shape == z.shape == (len(TEXTS), projection_dim or 32)
    torch.testing.assert_close(got, z, atol=1e-5, rtol=0)
    # the label names sit in config.json, and transformers still loads the encoder
    encoder = AutoModel.from_pretrained(best)
    assert encoder.config.id2label == dict(enumerate(LABELS))
    assert encoder.config.label2id == {name: i for i, name in enumerate(LABELS)}


def test_a_pooler_sentence_transformers_cannot_reproduce_is_left_out_or_refused(tmp_path, tiny_model_dir, capsys):
    """Training must not fail on it: best/ keeps id2label without the layout; the st export refuses it."""
    from metric_ds.artifact import write_sentence_transformers

    best = make_export(tmp_path / "best", tiny_model_dir, "pooler")
    (best / "modules.json").unlink()
    config = json.loads((best / "config.json").read_text())
    (best / "config.json").write_text(json.dumps({**config, "model_type": "deberta-v2", "id2label": {}}))
    write_sentence_transformers(best)
    assert not (best / "modules.json").exists()
    assert json.loads((best / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(LABELS)}
    capsys.readouterr()
    assert main(["export", str(best), "--format", "st", "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "not of model_type 'deberta-v2'" in err and "--format onnx" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.slow
@pytest.mark.parametrize("projection_dim", [None, 8])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_onnx_runtime_matches_pytorch(tmp_path, tiny_model_dir, pooling, projection_dim):
    import onnx

    from metric_ds.export import export_onnx

    best = make_export(tmp_path / "best", tiny_model_dir, pooling, projection_dim)
    diffs = export_onnx(best, tmp_path / "onnx")
    assert max(diffs.values()) <= 1e-4
    graph = onnx.load(str(tmp_path / "onnx" / ONNX_FILE)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["logits", "embedding"]
    for value in graph.input:  # batch and sequence are named dimensions, not fixed sizes
        assert all(d.dim_param and not d.dim_value for d in value.type.tensor_type.shape.dim)
    # batch sizes and lengths other than the traced ones: one text, then four of different lengths
    logits, _, z = reference(best)
    for rows in (slice(1, 2), slice(0, 4)):
        got = ort_outputs(tmp_path / "onnx", TEXTS[rows])
        np.testing.assert_allclose(got["logits"], logits[rows].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["embedding"], z[rows].numpy(), atol=1e-4, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "onnx" / ONNX_FILE)).metadata_props}
    assert json.loads(meta["id2label"]) == {str(i): n for i, n in enumerate(LABELS)}
    assert meta["max_seq_length"] == str(MAX_LEN)


def test_trained_best_is_a_sentence_transformers_folder(tiny_run):
    from sentence_transformers import SentenceTransformer

    best = tiny_run / "best"
    st = SentenceTransformer(str(best), device="cpu")
    assert st.max_seq_length == MAX_LEN  # training.max_seq_length of conftest's tiny_run
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), reference(best)[2], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_export_command_on_a_run_folder(tiny_run, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    assert main(["export", str(tiny_run), "--format", "st", "--output", str(tmp_path / "st")]) == 0
    assert main(["export", str(tiny_run), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    assert "ONNX Runtime vs PyTorch" in capsys.readouterr().out
    logits, _, z = reference(tiny_run / "best")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), z, atol=1e-5, rtol=0)
    got = ort_outputs(tmp_path / "onnx", TEXTS)
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["embedding"], z.numpy(), atol=1e-4, rtol=0)
    assert {"tokenizer.json", "tokenizer_config.json", "labels.json"} <= {p.name for p in (tmp_path / "onnx").iterdir()}


def test_export_command_on_an_export_folder(tmp_path, tiny_model_dir):
    """An export without the sentence-transformers files (as older runs wrote it) gets them in the copy."""
    from sentence_transformers import SentenceTransformer

    best = make_export(tmp_path / "best", tiny_model_dir, "cls", 8)
    for name in ("modules.json", "sentence_bert_config.json"):
        (best / name).unlink()
    (tmp_path / "out").mkdir()  # an empty output folder is fine
    assert main(["export", str(best), "--format", "st", "--output", str(tmp_path / "out")]) == 0
    assert not (best / "modules.json").exists()  # the source is left as it was
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), reference(best)[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["not_an_export", "missing_source", "output_not_empty", "output_is_a_file"])
def test_export_refuses_bad_input(tmp_path, tiny_model_dir, capsys, case):
    best = make_export(tmp_path / "best", tiny_model_dir)
    source, output = best, tmp_path / "out"
    if case == "not_an_export":
        source = tmp_path / "not_a_model"
        source.mkdir()
        (source / "config.json").write_text("{}")
    elif case == "missing_source":
        source = tmp_path / "nowhere"
    elif case == "output_not_empty":
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    else:
        output.write_text("a file")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["export", str(source), "--format", "st", "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    expected = {"not_an_export": "neither a metric_ds export", "missing_source": "no such folder",
                "output_not_empty": "not empty", "output_is_a_file": "a file of that name exists"}[case]
    assert expected in err and (str(source) in err or str(output) in err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("call, code, words", [
    ("mkdir", errno.EROFS, "read-only file system"),  # --output on a read-only mount
    ("replace", errno.EBUSY, "a mount point?"),  # --output is the mount point itself
    ("mkdir", errno.EPERM, "immutable"),  # chattr +i on the parent
])
def test_an_unwritable_target_is_one_error_line(tmp_path, tiny_model_dir, monkeypatch, capsys, call, code, words):
    import os

    best = make_export(tmp_path / "best", tiny_model_dir)
    output = tmp_path / "target" / "out"
    output.mkdir(parents=True)  # an empty folder: export may replace it
    real = getattr(os, call)

    def refused(path, *args, **kwargs):  # noqa: ANN001
        target = args[0] if call == "replace" else path
        if Path(target).parent == output.parent:
            raise OSError(code, os.strerror(code), str(target))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, call, refused)
    capsys.readouterr()
    assert main(["export", str(best), "--format", "st", "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert f"--output {output}: {os.strerror(code).lower()}" in err and words in err
    assert sorted(p.name for p in output.parent.iterdir()) == ["out"] and not any(output.iterdir())


def test_a_mount_point_as_output_is_one_error_line(tmp_path, tiny_model_dir, capsys):
    """A real mount point where the test may mount a tmpfs: renaming onto it is refused (EBUSY)."""
    best = make_export(tmp_path / "best", tiny_model_dir)
    with tmpfs(tmp_path / "mnt") as output:
        capsys.readouterr()
        assert main(["export", str(best), "--format", "st", "--output", str(output)]) == 1
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and "Traceback" not in err and f"--output {output}: " in err, err
        assert not list(tmp_path.glob(".*partial*"))


def test_unknown_format_is_refused(tmp_path, tiny_model_dir, capsys):
    from metric_ds.commands.export import export
    from metric_ds.errors import UserError

    best = make_export(tmp_path / "best", tiny_model_dir)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(best), "--format", "tflite", "--output", str(tmp_path / "out")])
    assert exc.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown export format; use one of st, onnx"):
        export(best, "tflite", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_optional_package_names_the_install(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(EnvironmentProblem, match=r"pip install 'metric-ds\[export\]' \(or pip install onnxscript\)"):
        require("onnxscript", "the ONNX export")
    best = make_export(tmp_path / "best", tiny_model_dir)
    assert main(["export", str(best), "--format", "onnx", "--output", str(tmp_path / "out")]) == 1
    assert "needs the optional package onnxscript" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))


def readme_block(marker: str) -> str:
    """The python block after ``<!-- readme-test: MARKER -->`` in README.md or docs/*.md."""
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    found = re.search(rf"<!-- readme-test: {re.escape(marker)} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"README.md and docs/*.md have no python block marked readme-test: {marker}"
    return found.group(1)


def run_block(code: str, variable: str, path: Path) -> dict:
    """Execute a README block with its folder variable pointed at ``path``; returns its variables."""
    code, count = re.subn(rf'^{variable} = ".*"$', f"{variable} = {str(path)!r}", code, flags=re.M)
    assert count == 1, f"the README block sets {variable} once"
    namespace: dict = {}
    exec(compile(code, f"README.md:{variable}", "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def test_readme_sentence_transformers_block(tmp_path, tiny_model_dir):
    best = make_export(tmp_path / "best", tiny_model_dir, "mean", 8)
    ns = run_block(readme_block("sentence-transformers"), "model_dir", best)
    logits, _, z = reference(best, ns["texts"])
    np.testing.assert_allclose(ns["embeddings"], z.numpy(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ns["logits"], logits, atol=1e-5, rtol=0)
    assert ns["predicted"] == [LABELS[i] for i in logits.argmax(-1).tolist()]


@pytest.mark.slow
def test_readme_onnx_reject_block(tmp_path, tiny_model_dir):
    """The docs' numpy rejection over an ONNX export answers what ``predict(reject=True, score="centroid")`` does."""
    import metric_ds
    from metric_ds.calibration import calibrate_folder
    from metric_ds.config import OpenSetConfig

    best = make_export(tmp_path / "best", tiny_model_dir, "mean", 8)
    def rows(texts: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"text": texts, "label": [LABELS[i % len(LABELS)] for i in range(len(texts))]})

    calibrate_folder(best, rows(["card lost", "refund please", "transfer money", "atm cash", "pin card"]),
                     rows(["my card is lost", "a refund", "send money", "cash machine", "top up"]),
                     OpenSetConfig(reject_rate=0.3), device="cpu")
    assert main(["export", str(best), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "reference.safetensors").is_file()  # the knn score's rows travel too
    ns = run_block(readme_block("onnx-reject"), "onnx_dir", tmp_path / "onnx")
    want = metric_ds.load(best, device="cpu").predict(ns["texts"], reject=True, score="centroid")
    np.testing.assert_allclose(ns["score"], want.in_scope_scores, atol=1e-4, rtol=0)
    assert ns["predicted"] == want.labels


@pytest.mark.slow
def test_readme_onnx_block(tmp_path, tiny_model_dir):
    best = make_export(tmp_path / "best", tiny_model_dir, "mean", 8)
    assert main(["export", str(best), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    ns = run_block(readme_block("onnx"), "onnx_dir", tmp_path / "onnx")
    logits, _, z = reference(best, ns["texts"])
    np.testing.assert_allclose(ns["logits"], logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ns["embeddings"], z.numpy(), atol=1e-4, rtol=0)
    assert ns["predicted"] == [LABELS[i] for i in logits.argmax(-1).tolist()]
