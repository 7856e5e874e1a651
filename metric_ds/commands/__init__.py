"""The ``metric-ds`` subcommands: one module each, with ``register(parser)`` (its arguments, whose choices and
defaults are read from the schemas) and ``run(args)``.

``metric_ds/cli.py`` builds the top parser from :data:`COMMANDS` and dispatches; the library modules below never
import a command.
"""

# the subcommands in the order ``metric-ds --help`` lists them, each with its one-line help; the module of
# ``pseudo-label`` is ``metric_ds.commands.pseudo_label``
COMMANDS: dict[str, str] = {
    "train": "train a model from a YAML config",
    "validate": "check a config and the dataset it points to, and summarise the data",
    'prepare': "convert a CSV/Parquet/JSONL table into metric_ds's format",
    "evaluate": "evaluate an exported model on a prepared table",
    "export": "export a model for sentence-transformers (st) or ONNX Runtime (onnx)",
    "calibrate": "choose a model's thresholds for rejecting out-of-scope texts (predict --reject)",
    "predict": "classify the texts of a table with a trained model",
    "embed": "embed the texts of a table with a trained model",
    "pseudo-label": "label unlabelled rows from clusters or neighbours of the labelled ones",
    "report": "plots and an HTML report of a run",
    "env": "versions, and whether the fused SupCon op is built for CPU and CUDA",
}


def module_name(command: str) -> str:
    """The module of a subcommand, e.g. ``metric_ds.commands.pseudo_label`` for ``pseudo-label``."""
    return "metric_ds.commands." + command.replace("-", "_")
