"""A damaged model folder (a run's best/) is refused in one line that names the file and the field, by every
command that reads one (predict, embed, export, evaluate, pseudo-label) and by ``metric_ds.load``; never a
traceback, never a silent fallback (``"pooling": "evil"`` once predicted as mean pooling)."""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_frame

import metric_ds
from metric_ds import artifact
from metric_ds.cli import main
from metric_ds.errors import UserError


def _edit_json(name: str, **changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**data, **changes}))
    return edit


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def cut(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
    return cut


# case -> (damage, what the message must say: the file, then the field or the cause)
DAMAGE = {
    "heads_garbage": (_write("heads.json", "garbage{{{"), r"heads\.json: not valid JSON"),
    "heads_list": (_write("heads.json", "[1, 2, 3]"), r"heads\.json: the top level must be a mapping"),
    "heads_empty_object": (_write("heads.json", "{}"), r"heads\.json: pooling: is required; num_classes: is required"),
    "heads_empty_file": (_write("heads.json", ""), r"heads\.json: (is empty|not valid JSON)"),
    "heads_binary": (lambda f: (f / "heads.json").write_bytes(b"\xff\xfe\x00garbage"), r"heads\.json: not valid"),
    "num_classes_word": (_edit_json("heads.json", num_classes="four"), r"heads\.json: num_classes: .*'four'"),
    "num_classes_digits": (_edit_json("heads.json", num_classes="4"), r"heads\.json: num_classes: .*'4'"),
    "num_classes_wrong": (_edit_json("heads.json", num_classes=7),
                          r"heads\.json: num_classes is 7, but labels\.json names 4 classes"),
    "num_classes_zero": (_edit_json("heads.json", num_classes=0), r"heads\.json: num_classes: must be >= 1"),
    "pooling_evil": (_edit_json("heads.json", pooling="evil"),
                     r"heads\.json: pooling: must be one of 'mean', 'cls' or 'pooler', got 'evil'"),
    "unknown_key": (_edit_json("heads.json", poolin="cls"), r"heads\.json: poolin: unknown key"),
    "projection_dim_wrong": (_edit_json("heads.json", projection_dim=8),
                             r"heads\.json: projection_dim is 8, but heads\.safetensors holds a projection to 16"),
    "projection_dim_null": (_edit_json("heads.json", projection_dim=None),
                            r"heads\.json: projection_dim is null, but heads\.safetensors holds a projection to 16"),
    "labels_garbage": (_write("labels.json", "not json at all"), r"labels\.json: not valid JSON"),
    "labels_list": (_write("labels.json", '["a", "b"]'), r"labels\.json: the top level must be a mapping"),
    "labels_no_names": (_write("labels.json", '{"type": "str"}'), r"labels\.json: names: is required"),
    "labels_duplicates": (_write("labels.json", '{"type": "str", "names": ["a", "a", "b", "c"]}'),
                          r"labels\.json: names: .*distinct.*'a'"),
    "labels_mixed_types": (_write("labels.json", '{"names": ["a", 2, "c", "d"]}'),
                           r"labels\.json: names: 2 are not of type str"),
    "labels_int_type_of_words": (_write("labels.json", '{"type": "int", "names": ["a", "b", "c", "d"]}'),
                                 r"labels\.json: names: .*type int"),
    "weights_truncated": (_truncate("heads.safetensors", 0.6), r"heads\.safetensors: unreadable"),
    "weights_header_cut": (_truncate("heads.safetensors", 0.01), r"heads\.safetensors: unreadable"),
    "weights_empty": (_write("heads.safetensors", ""), r"heads\.safetensors: unreadable"),
    "encoder_truncated": (_truncate("model.safetensors", 0.5), r"model\.safetensors: unreadable"),
}


@pytest.fixture
def damaged(tiny_run, tmp_path, request) -> tuple[Path, str]:
    """A copy of the session's trained best/ with one file damaged, and the message it must give."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_run / "best", folder)
    damage, message = DAMAGE[request.param]
    damage(folder)
    return folder, message


@pytest.fixture
def table(tmp_path) -> Path:
    """A labelled table, and beside it (for pseudo-label) the same with a quarter of the labels left empty."""
    path = tmp_path / "texts.parquet"
    frame = make_frame(40)
    frame.to_parquet(path)
    frame.assign(label=[*frame["label"][:30], *[None] * 10]).to_parquet(tmp_path / "partly_labelled.parquet")
    return path


def _argv(command: str, folder: Path, table: Path, out: Path) -> list[str]:
    return {
        "predict": ["predict", "--model", str(folder), "--input", str(table), "--output", str(out / "p.parquet")],
        "embed": ["embed", "--model", str(folder), "--input", str(table), "--output", str(out / "e.npy")],
        "export": ["export", str(folder), "--format", "st", "--output", str(out / "st")],
        "evaluate": ["evaluate", "--model", str(folder), "--data", str(table), "--output", str(out / "e.json")],
        "pseudo-label": ["pseudo-label", "--input", str(table.parent / "partly_labelled.parquet"), "--output", str(out / "pl.parquet"),
                         "--model", str(folder)],
    }[command]


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
@pytest.mark.parametrize("command", ["predict", "embed", "export", "evaluate", "pseudo-label"])
def test_every_command_refuses_a_damaged_export_in_one_line(damaged, command, table, tmp_path, capsys):
    folder, message = damaged
    out = tmp_path / "out"
    assert main(_argv(command, folder, table, out)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert str(folder) in lines[0], err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() or not any(out.iterdir())  # nothing written


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_load_refuses_a_damaged_export(damaged):
    folder, message = damaged
    with pytest.raises(UserError, match=message) as info:
        metric_ds.load(folder, device="cpu")
    assert len(info.value.messages) == 1 and str(folder) in info.value.messages[0]


def test_heads_of_another_width_name_the_tensor_and_the_encoder(tiny_run, tmp_path):
    """Heads trained on another encoder: heads.safetensors reads vectors of another width than the encoder gives."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_run / "best", folder)
    heads = load_file(str(folder / "heads.safetensors"))
    heads = {k: (torch.zeros(v.shape[0], 48) if v.dim() == 2 else v) for k, v in heads.items()}
    save_file(heads, str(folder / "heads.safetensors"))
    with pytest.raises(UserError, match=r"heads\.safetensors: classifier\.weight holds \(4, 48\) where \(4, 32\) is "
                                        r"needed; .* config\.json, hidden_size 32"):
        artifact.load_model(folder)


def test_the_heads_schema_takes_pooling_from_the_training_config():
    """One home for the pooling choices: heads.json accepts exactly model.pooling's."""
    from typing import get_args

    from metric_ds.config import ModelConfig

    choices = get_args(ModelConfig.model_fields["pooling"].annotation)
    assert get_args(artifact.HeadsMeta.model_fields["pooling"].annotation) == choices


def test_a_sound_export_still_loads_and_validates(tiny_run, tmp_path):
    meta = artifact.read_heads_meta(tiny_run / "best")
    assert meta.num_classes == 4 and meta.projection_dim == 16 and meta.pooling == "mean"
    assert artifact.check_model_folder(tiny_run / "best") == (meta, artifact.read_labels(tiny_run / "best"))
    older = tmp_path / "older"  # labels.json without its type, heads.json without classifier_dropout
    shutil.copytree(tiny_run / "best", older)
    _write("labels.json", json.dumps({"names": artifact.read_labels(older).names}))(older)
    heads = json.loads((older / "heads.json").read_text())
    heads.pop("classifier_dropout")
    _write("heads.json", json.dumps(heads))(older)
    assert artifact.load_model(older)[0].classifier_dropout == 0.0
    model = metric_ds.load(tiny_run, device="cpu")
    assert model.labels == artifact.read_labels(tiny_run / "best").names


def test_a_truncated_plain_encoder_is_a_user_error(tmp_path, tiny_model_dir):
    """`pseudo-label --model ENCODER` (no heads): a truncated model.safetensors is one clear error, no traceback."""
    import shutil

    from metric_ds.model import load_encoder

    folder = tmp_path / "encoder"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="model_name: could not load .*encoder"):
        load_encoder(str(folder))


def test_an_encoder_with_tensors_missing_is_a_user_error(tmp_path, tiny_model_dir):
    """Weights that leave part of the config's architecture out would load as random tensors with only a warning:
    one clear error naming the folder and the tensors instead. A checkpoint without the (unused) pooler loads."""
    import shutil

    from safetensors.torch import load_file, save_file

    from metric_ds.model import load_encoder

    folder = tmp_path / "encoder"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    load_encoder(str(folder))  # no pooler: fine
    save_file({k: v for k, v in weights.items() if "layer.1." not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"do not match its config.json: \d+ tensor\(s\).*layer\.1\."):
        load_encoder(str(folder))
