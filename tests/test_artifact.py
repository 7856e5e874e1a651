"""The model folder (metric_ds.artifact): what save_model writes, how a path is resolved, what is read back, and
that the model-folder code and the nn.Module code import one way only."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from metric_ds import artifact
from metric_ds.config import TrainingConfig
from metric_ds.data.labels import LabelMap
from metric_ds.errors import UserError
from metric_ds.model import MetricClassifier

PACKAGE = Path(artifact.__file__).parent
LABELS = ["b", "a", "c"]


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    model = MetricClassifier(AutoModel.from_pretrained(tiny_model_dir), len(LABELS), "mean", 8).eval()
    folder = tmp_path_factory.mktemp("artifact") / "best"
    table = folder.parent / "train.parquet"
    artifact.save_model(folder, model, AutoTokenizer.from_pretrained(tiny_model_dir),
                        label_map=LabelMap.from_labels(LABELS), config={"training": {"max_seq_length": 24}},
                        metrics={"step": 3, "val/acc": 0.5}, train_table=table)
    return folder


def test_save_model_writes_every_file_and_loads_back(saved):
    names = {p.name for p in saved.iterdir()}
    assert {artifact.HEADS_META, artifact.HEADS_WEIGHTS, artifact.LABELS, artifact.METRICS, artifact.CONFIG,
            artifact.TRAINING_DATA, "config.json", "model.safetensors", "modules.json"} <= names
    assert json.loads((saved / artifact.METRICS).read_text()) == {"step": 3, "val/acc": 0.5}
    assert json.loads((saved / "sentence_bert_config.json").read_text())["max_seq_length"] == 24
    model, _ = artifact.load_model(saved)
    assert not model.training and model.projection_dim == 8 and model.output_dims() == {"logits": 3, "h": 32,
                                                                                        "z": 8}
    assert artifact.read_labels(saved).names == ["a", "b", "c"]
    assert artifact.read_label_names(saved) == ["a", "b", "c"]
    assert artifact.read_max_seq_length(saved) == 24
    assert artifact.read_training_table(saved) == str((saved.parent / "train.parquet").resolve())


def test_readers_fall_back_when_a_file_is_missing(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    for name in (artifact.CONFIG, artifact.TRAINING_DATA, artifact.LABELS):
        (copy / name).unlink()
    # one default: the training config's
    assert artifact.read_max_seq_length(copy) == artifact.DEFAULT_MAX_SEQ_LENGTH
    assert artifact.DEFAULT_MAX_SEQ_LENGTH == TrainingConfig().max_seq_length
    assert artifact.read_training_table(copy) is None and artifact.read_label_names(copy) is None


def test_resolve_takes_a_model_folder_or_its_run_folder(saved, tmp_path):
    assert artifact.resolve_model_folder(saved) == saved
    run = tmp_path / "run"
    shutil.copytree(saved, run / "best")
    assert artifact.resolve_model_folder(run) == run / "best"


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder; give a run folder"),
    ("plain", "is neither a metric_ds export (it has no heads.json) nor a run folder"),
    ("no_labels", "has no labels.json"),
])
def test_resolve_refuses_with_a_fix(saved, tmp_path, case, message):
    path = tmp_path / case
    if case == "plain":
        path.mkdir()
    elif case == "no_labels":
        shutil.copytree(saved, path)
        (path / artifact.LABELS).unlink()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        artifact.resolve_model_folder(path)


def test_load_model_refuses_a_folder_without_heads(tmp_path):
    with pytest.raises(UserError, match="no heads.json"):
        artifact.load_model(tmp_path)


def _imports(module: Path) -> set[str]:
    """Every metric_ds module that ``module`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("metric_ds"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("metric_ds")}
    return found


def test_the_model_folder_code_imports_one_way():
    """model <- artifact <- export/encode users: the nn.Module code imports neither export nor artifact, and
    nothing that artifact imports imports it back."""
    assert not _imports(PACKAGE / "model.py") & {"metric_ds.export", "metric_ds.artifact", "metric_ds.encode"}
    for name in ("model", "st_layout", "config", "run_folder", "data/labels", "errors", "encode"):
        assert "metric_ds.artifact" not in _imports(PACKAGE / f"{name}.py"), name
    assert "metric_ds.export" not in _imports(PACKAGE / "artifact.py")
