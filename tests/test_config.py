"""The config schema: defaults, constraints with full key paths, unknown keys, overrides, shipped YAMLs."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from metric_ds.config import RENAMED_KEYS, Config, apply_overrides, load_config, validate_config
from metric_ds.ds_config import build_ds_config
from metric_ds.errors import UserError
from metric_ds.resume import check_resume

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def minimal(**sections) -> dict:
    data = {"data": {"train_path": "train.parquet"}}
    for key, value in sections.items():
        data[key] = value
    return data


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_loads(path):
    assert isinstance(load_config(path), Config)


def test_example_documents_every_key():
    """The example YAML names every key of the schema (so the reference cannot rot)."""
    example = yaml.safe_load((CONFIGS[0].parent / "metric_classifier_training.example.yaml").read_text())

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Config.__mro__[1]):
                yield from keys(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    def lookup(data, path):
        for part in path.split("."):
            assert part in data, f"{path} missing from the example config"
            data = data[part]

    for key in keys(Config):
        lookup(example, key)


def test_defaults():
    cfg = validate_config(minimal())
    assert cfg.training.supcon_temperature == 0.07
    assert cfg.model_name is None and cfg.run_name == "run"
    assert cfg.metric_validation.recall_at_k == [1, 5, 10]


def test_all_errors_at_once_with_key_paths():
    data = minimal(training={"supcon_temperature": -0.1, "batch_size": 0, "mixed_precision": "fp8"})
    data["data"]["val_ratio"] = 1.5
    with pytest.raises(UserError) as info:
        validate_config(data, source="cfg.yaml")
    text = str(info.value)
    assert "training.supcon_temperature: must be > 0" in text and "got -0.1" in text
    assert "training.batch_size: must be > 0" in text
    assert "training.mixed_precision: must be one of" in text
    assert "data.val_ratio: must be < 1" in text
    assert len(info.value.messages) == 4
    assert all(m.startswith("cfg.yaml: ") for m in info.value.messages)


@pytest.mark.parametrize("ratio", [0, 1, -0.2, 1.5])
def test_val_ratio_outside_unit_interval(ratio):
    data = minimal()
    data["data"]["val_ratio"] = ratio
    with pytest.raises(UserError, match="data.val_ratio"):
        validate_config(data)


def test_unknown_key_suggests():
    data = minimal(training={"supcon_temprature": 0.1})
    with pytest.raises(UserError, match=r"training.supcon_temprature: unknown key; did you mean 'supcon_temperature'"):
        validate_config(data)
    with pytest.raises(UserError, match=r"trainng: unknown key; did you mean 'training'"):
        validate_config({**minimal(), "trainng": {}})


def test_missing_required():
    with pytest.raises(UserError, match="data.train_path: is required"):
        validate_config({"data": {}})


def test_old_spelling_is_an_alias(recwarn):
    cfg = validate_config(minimal(checkpointing={"save_every_n_bathces": 7}))
    assert cfg.checkpointing.save_every_n_batches == 7
    assert any("save_every_n_bathces is deprecated" in str(w.message) for w in recwarn.list)


def _value(old: str):
    return old.rpartition("_")[0] + ".csv" if old.startswith("data.") else 7


def _with_key(path: str, value) -> dict:
    data = minimal()
    section, _, key = path.rpartition(".")
    node = data.setdefault(section, {}) if section else data
    node[key] = value
    return data


@pytest.mark.parametrize("old, new", sorted(RENAMED_KEYS.items()))
def test_renamed_keys_accept_their_old_name(old, new, recwarn):
    """A renamed key still loads under its old name, with a FutureWarning that names the new one."""
    data = _with_key(old, _value(old))
    if old == "data.parquet_path":
        del data["data"]["train_path"]
    value = validate_config(data).to_dict()
    for part in new.split("."):
        value = value[part]
    assert value == _value(old)
    messages = [str(w.message) for w in recwarn.list if w.category is FutureWarning]
    assert any(f"{old} is deprecated: rename it to {new.rpartition('.')[2]}" in m for m in messages)


@pytest.mark.parametrize("old, new", sorted(RENAMED_KEYS.items()))
def test_both_names_of_a_key_are_an_error(old, new):
    data = _with_key(new, _value(old))
    node, old_name, new_name = data[old.partition(".")[0]], old.rpartition(".")[2], new.rpartition(".")[2]
    node[old_name] = node[new_name]
    with pytest.raises(UserError, match=f"give {new_name} only \\({old_name} is its old name\\)"):
        validate_config(data)


def test_set_takes_the_old_name_and_replaces_either(recwarn):
    data = apply_overrides({"data": {"parquet_path": "old.parquet"}}, ["data.train_path=new.parquet"])
    assert validate_config(data).data.train_path == "new.parquet"
    data = apply_overrides(minimal(), ["data.parquet_path=2024", "metric_validation.keep_last_n_emb_steps=3"])
    cfg = validate_config(data)
    assert cfg.data.train_path == "2024" and cfg.metric_validation.train_bank_steps == 3  # a path stays text
    assert any("--set data.parquet_path: data.parquet_path is deprecated: use data.train_path" in str(w.message)
               for w in recwarn.list)


def test_resume_reads_a_checkpoint_saved_under_the_old_names():
    """A run saved before the renames resumes: its saved config names the keys the old way."""
    new = validate_config(minimal()).to_dict()
    old = copy.deepcopy(new)
    old["data"]["parquet_path"] = old["data"].pop("train_path")
    old["data"]["val_parquet_path"] = old["data"].pop("val_path")
    old["metric_validation"]["keep_last_n_emb_steps"] = old["metric_validation"].pop("train_bank_steps")
    check_resume(old, "f", new, "f", "ckpt")
    old["metric_validation"]["keep_last_n_emb_steps"] = 7
    with pytest.raises(UserError, match="metric_validation.train_bank_steps: 7 in the checkpoint, 50 now"):
        check_resume(old, "f", new, "f", "ckpt")


def test_pk_needs_sizes_and_both_weights_zero():
    data = minimal(training={"classification_loss_weight": 0, "metric_loss_weight": 0})
    data["data"]["sampler"] = "pk"
    with pytest.raises(UserError) as info:
        validate_config(data)
    assert len(info.value.messages) == 2


def test_best_metric_must_be_computable():
    """knn_* needs the bank; acc/f1 need a trained classifier. Cross-section errors name the key path."""
    with pytest.raises(UserError) as info:
        validate_config(minimal(checkpointing={"save_best_by": "knn_f1"},
                                metric_validation={"train_bank_steps": 0}))
    assert info.value.messages[0].startswith("config: checkpointing.save_best_by: 'knn_f1' is computed against")
    with pytest.raises(UserError, match="checkpointing.save_best_by: 'f1' scores a classifier"):
        validate_config(minimal(training={"classification_loss_weight": 0}))
    cfg = validate_config(minimal(training={"classification_loss_weight": 0},
                                  checkpointing={"save_best_by": "knn_f1"}))
    assert cfg.checkpointing.save_best_by == "knn_f1"


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    cfg = load_config(path, ["training.batch_size=16", "metric_validation.recall_at_k=[1, 3]", "model_name=null",
                             "deepspeed.zero_stage=2"])
    assert cfg.training.batch_size == 16 and cfg.metric_validation.recall_at_k == [1, 3]
    assert cfg.deepspeed.zero_stage == 2
    with pytest.raises(UserError, match="training.batch_size: must be > 0"):
        load_config(path, ["training.batch_size=-1"])
    with pytest.raises(UserError, match="expected key.path=value"):
        load_config(path, ["training.batch_size"])


def test_missing_and_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_deepspeed_passthrough_and_conflicts():
    cfg = validate_config(minimal(deepspeed={"zero_stage": 2, "config": {"zero_optimization": {"overlap_comm": False},
                                                                          "wall_clock_breakdown": True}}))
    ds = build_ds_config(cfg)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert ds["wall_clock_breakdown"] is True and ds["train_micro_batch_size_per_gpu"] == 32
    with pytest.raises(UserError, match="'gradient_clipping' is set by training.gradient_clip_val"):
        validate_config(minimal(deepspeed={"config": {"gradient_clipping": 2.0}}))
    with pytest.raises(UserError, match="'zero_optimization.stage' is set by deepspeed.zero_stage"):
        validate_config(minimal(deepspeed={"config": {"zero_optimization": {"stage": 3}}}))


def test_run_name_cannot_leave_checkpoints_dir():
    for name in ("..", ".", "a/b"):
        with pytest.raises(UserError, match="run_name"):
            validate_config({"data": {"train_path": "x"}, "run_name": name})


@pytest.mark.parametrize("item, key, expected", [
    ("run_name=2024", "run_name", "2024"), ("run_name=no", "run_name", "no"), ("run_name=1.10", "run_name", "1.10"),
    ("training.mixed_precision=no", "training.mixed_precision", "no"),
    ("training.batch_size=16", "training.batch_size", 16),
    ("metric_validation.recall_at_k=[1, 5]", "metric_validation.recall_at_k", [1, 5]),
])
def test_set_values_follow_the_schema_type(item, key, expected):
    cfg = validate_config(apply_overrides({"data": {"train_path": "x"}}, [item]))
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


@pytest.mark.parametrize("item", ["training.batch_size=true", "training.supcon_temperature=yes"])
def test_a_bool_is_not_a_number(item):
    with pytest.raises(UserError, match="expected a number, got true"):
        validate_config(apply_overrides({"data": {"train_path": "x"}}, [item]))


@pytest.mark.parametrize("text, key, expected", [
    ("logging: {progress: off}", "logging.progress", "off"),
    ("logging: {progress: OFF}", "logging.progress", "off"),
    ("training: {mixed_precision: no}", "training.mixed_precision", "no"),
    ("training: {mixed_precision: No}", "training.mixed_precision", "no"),
    ("checkpointing: {overwrite: yes}", "checkpointing.overwrite", True),  # a bool key takes the bool as it is
])
def test_yaml_on_off_words_are_the_choices_they_spell(tmp_path, text, key, expected):
    """YAML 1.1 reads an unquoted off/no as false: a key whose choices include the word gets it back, from a file
    as from --set."""
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{train_path: x}}\n{text}\n")
    section, name = key.split(".")
    assert getattr(getattr(load_config(path), section), name) == expected
    word = text.split(": ")[-1].rstrip("}")
    if word == expected:  # --set takes a choice's text as typed
        assert getattr(getattr(load_config(path, [f"{key}={word}"]), section), name) == expected


@pytest.mark.parametrize("section, text, message", [
    ("model", "pooling: yes", "must be one of 'mean', 'cls', 'pooler', got true (.*quote the word)"),
    ("training", "mixed_precision: on", "must be one of 'no', 'fp16', 'bf16', got true (.*quote the word)"),
    ("top", "run_name: no", "run_name: expected text, got false (.*quote the word)"),
    ("training", "batch_size: yes", "expected a number, got true"),
    ("deepspeed", "zero_stage: on", "deepspeed.zero_stage: expected a number, got true"),
])
def test_a_yaml_bool_elsewhere_is_refused_and_says_to_quote(tmp_path, section, text, message):
    path = tmp_path / "c.yaml"
    body = text if section == "top" else f"{section}:\n  {text}"
    path.write_text(f"data: {{train_path: x}}\n{body}\n")
    with pytest.raises(UserError, match=message):
        load_config(path)


def test_a_config_file_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"run_name: \xff\xfe\n")
    with pytest.raises(UserError, match="c.yaml: not valid YAML \\(not UTF-8 text"):
        load_config(path)
