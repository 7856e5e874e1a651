"""``metric-ds calibrate --model M --data V``: (re)calibrate a model folder for ``predict --reject``.

Writes ``open_set.json`` and ``reference.safetensors`` into the model folder (:mod:`metric_ds.open_set`): each
in-scope score's threshold, chosen on the rows of ``--data`` whose label is one of the model's classes (rows of
other labels, or of ``--unknown-label``, are left out and counted), and the reference rows (``--reference-data``,
by default the model's training table) that the ``knn`` and ``centroid`` scores compare with. The end of training
does the same with the run's validation split (``open_set.calibrate``).
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any

from metric_ds.errors import UserError


def parse_label(value: str | None, names: list[Any]) -> Any:
    """A label given on the command line, as an int when the model's labels are ints and it reads as one."""
    if value is not None and names and isinstance(names[0], int):
        try:
            return int(value)
        except ValueError:
            pass
    return value


SETTINGS = ("score", "reject_rate", "knn_k", "unknown_label", "max_reference_rows")


def _settings(args: argparse.Namespace, folder: Any, names: list[Any]) -> SimpleNamespace:
    """Each ``open_set`` setting: the command line's, else the folder's current calibration's, else the schema's
    default (so recalibrating on new data keeps what the model was calibrated with)."""
    from metric_ds.config import schema_default
    from metric_ds.open_set import read as read_open_set

    try:
        current = read_open_set(folder)
    except UserError:  # a damaged calibration is what this command replaces
        current = None
    values = {}
    recorded = current.settings.calibration if current is not None else {}
    for key in SETTINGS:
        given = getattr(args, key)
        if key == "unknown_label":
            given = parse_label(given, names)
        kept = getattr(current.settings, key, recorded.get(key)) if current is not None else None
        values[key] = given if given is not None else kept if kept is not None else schema_default(f"open_set.{key}")
    values["seed"] = args.seed if args.seed is not None else recorded.get("seed", 0)
    return SimpleNamespace(**values)


def calibrate_command(args: argparse.Namespace) -> None:
    from metric_ds.artifact import read_labels, read_training_table, resolve_model_folder
    from metric_ds.calibration import calibrate_folder
    from metric_ds.data.io import read_table
    from metric_ds.data.validation import validate_frame

    folder = resolve_model_folder(args.model)
    reference = args.reference_data or read_training_table(folder)
    if reference is None:
        raise UserError(f"{folder} records no training table: give --reference-data, the labelled rows (text, "
                        "label) that the knn and centroid scores compare with")
    names = read_labels(folder).names
    settings = _settings(args, folder, names)
    val = read_table(args.data)
    missing = [c for c in ("text", "label") if c not in val.columns]
    if missing:
        raise UserError(f"{args.data}: missing column(s) {', '.join(missing)}; it has {', '.join(map(str, val.columns))}")
    ref = validate_frame(read_table(reference), str(reference), allow_label_free=True)  # they place no class
    found = calibrate_folder(folder, val, ref, settings, args.device, (str(args.data), str(reference)), settings.seed,
                             args.batch_size)
    c = found.settings.calibration
    left = f" ({c['rows_left_out']} row(s) of other labels left out)" if c["rows_left_out"] else ""
    if c["reference_rows_shared_with_data"]:
        left += (f"; {c['reference_rows_shared_with_data']} reference row(s) with a calibration row's text left out "
                 "of the reference")
    print(f"calibrated {folder} on {c['rows']} known-class row(s) of {args.data}{left}, against "
          f"{c['reference_rows']} reference row(s)")
    for name, value in found.settings.thresholds.items():
        print(f"  {name:<8} threshold {value:.4f}{'  (default)' if name == found.settings.score else ''}")


def register(sp: argparse.ArgumentParser) -> None:
    """The ``calibrate`` parser; the defaults are the ``open_set`` section's (:mod:`metric_ds.config`)."""
    from metric_ds.commands.arguments import add_field_argument
    from metric_ds.config import schema_field

    sp.add_argument("--model", required=True, help="a model folder (a run's best/) or its run folder")
    sp.add_argument("--data", required=True,
                    help="calibration rows (text, label): the known classes' validation rows; rows of other labels "
                         "are left out")
    sp.add_argument("--reference-data", default=None,
                    help="labelled rows the knn and centroid scores compare with (default: the model's training table)")
    kept = "default: the model's current calibration, else open_set's"
    for flag, what in (("--score", "the default score of predict --reject"),
                       ("--reject-rate", "each threshold rejects at most this share of the calibration rows"),
                       ("--knn-k", "neighbours averaged by the knn score"),
                       ("--max-reference-rows", "the most reference rows the knn score searches")):
        field = schema_field("open_set." + flag[2:].replace("-", "_"))
        add_field_argument(sp, flag, field, help=f"{what} ({kept}: {field.default})").default = None
    sp.add_argument("--unknown-label", default=None, help=f"what predict --reject answers ({kept}: 'unknown')")
    sp.add_argument("--seed", type=int, default=None,
                    help=f"the draw of reference rows beyond --max-reference-rows ({kept}: 0)")
    sp.add_argument("--batch-size", type=int, default=None, help="texts per forward pass")
    sp.add_argument("--device", default=None, help="cuda, cpu... (default: the GPU when there is one)")
    sp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    calibrate_command(args)
