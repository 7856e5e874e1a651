"""The ``metric-ds`` subcommands that are more than a call into the library: one module each.

``metric_ds/cli.py`` holds the argument parser and dispatches here; the library modules below never import a
command.
"""
