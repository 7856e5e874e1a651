"""The ``metric-ds`` subcommands: one module each, with ``register(subparsers)`` (its parser, whose choices and
defaults are read from the schemas) and ``run(args)``.

``metric_ds/cli.py`` builds the top parser from :data:`COMMANDS` and dispatches; the library modules below never
import a command.
"""

# the modules of metric_ds.commands, in the order ``metric-ds --help`` lists them
COMMANDS = ("train", "validate", "prepare", "evaluate", "export", "predict", "embed", "pseudo_label", "report", "env")
