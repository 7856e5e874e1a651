"""docs/configuration.md and the example YAML are generated from the schema, current, and load back."""
from __future__ import annotations

import warnings

import pytest
import yaml
from conftest import REPO

from metric_ds import config_docs
from metric_ds.config import RENAMED_KEYS, Config, validate_config


def _fields():
    for section, _, fields in config_docs.sections():
        for name, field in fields.items():
            yield (f"{section}.{name}" if section else name), field


@pytest.mark.parametrize("path", sorted(config_docs.TARGETS), ids=str)
def test_generated_file_is_current(path):
    """Fails when the schema changed and the file was not regenerated: run python -m metric_ds.config_docs."""
    assert (REPO / path).read_text(encoding="utf-8") == config_docs.TARGETS[path](), (
        f"{path} is stale: run python -m metric_ds.config_docs")


def test_check_flags_stale_and_missing_files(tmp_path, capsys):
    assert config_docs.main(["--root", str(tmp_path), "--check"]) == 1
    assert config_docs.main(["--root", str(tmp_path)]) == 0
    assert config_docs.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / config_docs.EXAMPLE).write_text("run_name: x\n")
    capsys.readouterr()
    assert config_docs.main(["--root", str(tmp_path), "--check"]) == 1
    assert "metric_classifier_training.example.yaml: stale" in capsys.readouterr().err
    assert config_docs.main(["--check"]) == 0  # this checkout


def test_every_field_is_described():
    sections = [name for name, f in Config.model_fields.items() if config_docs._is_section(f)]
    assert all(Config.model_fields[name].description for name in sections)
    missing = [path for path, field in _fields() if not field.description]
    assert not missing, f"fields without Field(description=...): {missing}"


def test_example_loads_back_to_the_defaults():
    """Every default (null, lists, 'no', 5.0e-05, {}) renders as YAML that validates to the same config."""
    data = yaml.safe_load(config_docs.render_example())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = validate_config(data)
    expected = Config(data={"train_path": Config.model_fields["data"].annotation.model_fields["train_path"]
                            .examples[0]})
    assert loaded.to_dict() == expected.to_dict()


def test_markdown_has_a_row_per_key_with_its_choices_and_old_names():
    page = config_docs.render_markdown()
    for path, field in _fields():
        name = path.rpartition(".")[2]
        assert f"| `{name}` | {config_docs.type_name(field.annotation)} |" in page, path
    assert "| `mixed_precision` | str | `'no'` | no, fp16, bf16 |" in page
    assert "| `val_ratio` | float | `0.1` | > 0, < 1 |" in page
    assert "| `recall_at_k` | list of int | `[1, 5, 10]` |" in page
    assert "| `train_path` | str | required |" in page
    for old, new in RENAMED_KEYS.items():
        assert f"| `{old}` | `{new}` |" in page


@pytest.mark.parametrize("value", [None, "no", [1, 5, 10], [], {}, 5e-5, True, "a: b", "x|y"])
def test_yaml_value_round_trips(value):
    assert yaml.safe_load(config_docs.yaml_value(value)) == value


def test_type_names():
    assert config_docs.type_name(int | None) == "int or null"
    assert config_docs.type_name(list[str]) == "list of str"
    assert config_docs.type_name(dict[str, int]) == "mapping"
