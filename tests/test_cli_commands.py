"""The CLI's shape: one module per subcommand with ``register``/``run``, and every default or choice that a
schema holds read from it, never restated in a parser."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest
from conftest import REPO

from metric_ds.cli import build_parser
from metric_ds.commands import COMMANDS, module_name
from metric_ds.commands.arguments import add_field_argument
from metric_ds.commands.pseudo_label import FLAGS, Options
from metric_ds.config import MetricValidationConfig, TrainingConfig, schema_field
from metric_ds.pseudo_label import Settings


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_command_module_registers_and_runs():
    for name in COMMANDS:
        module = importlib.import_module(module_name(name))
        assert callable(module.register) and callable(module.run), name
    assert list(subparsers()) == list(COMMANDS)
    for name, sp in subparsers().items():
        assert sp.get_default("fn").__module__ == module_name(name)
        assert sp.get_default("fn").__name__ == "run"


def test_help_imports_no_command_module():
    """``metric-ds --help`` (and any one command) imports only what it runs: no torch to list the commands."""
    code = ("import sys; from metric_ds.cli import build_parser; build_parser(full=[]).format_help(); "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'pandas', 'metric_ds.commands.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_main_imports_the_named_command_only():
    code = ("import sys; from metric_ds.cli import main; main(['--debug', 'env']); "
            "print(sorted(m for m in sys.modules if m.startswith('metric_ds.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip().splitlines()[-1] == "['metric_ds.commands.env']"


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_retrieval_defaults_are_the_schema_defaults(command):
    sp = subparsers()[command]
    mv = MetricValidationConfig()
    assert option(sp, "--knn-k").default == mv.knn_k
    assert option(sp, "--distance").default == mv.distance and option(sp, "--distance").choices == ["cos", "l2"]
    if command == "evaluate":
        assert option(sp, "--recall-at-k").default == mv.recall_at_k and option(sp, "--recall-at-k").nargs == "+"


def test_pseudo_label_defaults_are_the_settings_defaults():
    sp = subparsers()["pseudo-label"]
    for name in Settings.model_fields:
        assert option(sp, "--" + name.replace("_", "-")).default == getattr(Settings(), name), name
    assert option(sp, "--max-seq-length").default == TrainingConfig().max_seq_length
    assert option(sp, "--method").choices == ["kmeans", "knn"]
    assert option(sp, "--input").required and not option(sp, "--model").required


def test_a_changed_schema_default_reaches_the_parser(monkeypatch):
    """The parser holds no copy: change the schema's default and --help shows the new one."""
    monkeypatch.setattr(schema_field("metric_validation.knn_k"), "default", 7)
    assert option(subparsers()["evaluate"], "--knn-k").default == 7
    assert option(subparsers()["predict"], "--knn-k").default == 7


def test_cli_flags_parse_to_options():
    args = build_parser().parse_args(["pseudo-label", "--input", "a.csv", "--output", "b.parquet", "--method", "knn",
                                      "--margin", "0.5", "--labelled-share", "0.4"])
    options = Options(**{name: getattr(args, name) for name in FLAGS})
    assert options.settings() == Settings(method="knn", margin=0.5, labelled_share=0.4)
    assert options.batch_size == 128 and options.summary is None


def test_field_argument_types():
    p = argparse.ArgumentParser()
    add_field_argument(p, "--share", Settings.model_fields["labelled_share"])
    add_field_argument(p, "--ks", schema_field("metric_validation.recall_at_k"))
    add_field_argument(p, "--method", Settings.model_fields["method"])
    add_field_argument(p, "--input", Options.model_fields["input"])
    args = p.parse_args(["--share", "0.5", "--ks", "3", "1", "--input", "x"])
    assert args.share == 0.5 and args.ks == [3, 1] and args.method == "kmeans" and args.input == "x"
    assert p.parse_args(["--input", "x"]).share is None
    with pytest.raises(SystemExit):
        p.parse_args([])  # --input is required
