"""What the commands' parsers share: an argument whose type, choices and default are a schema field's, so that the
parser never restates them (``metric_validation.knn_k`` in :mod:`metric_ds.config`, the pseudo-label settings
in :mod:`metric_ds.pseudo_label.settings`)."""
from __future__ import annotations

import argparse
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo


def add_field_argument(parser: argparse.ArgumentParser, flag: str, field: FieldInfo, **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(flag, ...)`` with the type, choices and default (or ``required``) of a pydantic field.

    Args:
        parser: the command's parser.
        flag: e.g. ``--knn-k``.
        field: e.g. ``schema_field("metric_validation.knn_k")`` or ``Settings.model_fields["margin"]``.
        kwargs: passed on (``help``, ``metavar``...).
    """
    kind = field.annotation
    if get_origin(kind) in (Union, UnionType):  # X | None: the flag's type is X; leaving the flag out gives None
        (kind,) = [arg for arg in get_args(kind) if arg is not type(None)]
    if get_origin(kind) is Literal:
        kwargs["choices"] = list(get_args(kind))
    elif get_origin(kind) is list:
        kwargs.update(nargs="+", type=get_args(kind)[0])
    elif kind in (int, float):
        kwargs["type"] = kind
    elif kind is bool:  # --flag / --no-flag
        kwargs["action"] = argparse.BooleanOptionalAction
    if field.is_required():
        kwargs["required"] = True
    else:
        kwargs["default"] = field.get_default(call_default_factory=True)
    return parser.add_argument(flag, **kwargs)
