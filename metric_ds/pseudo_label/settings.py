"""The settings of pseudo-labelling: a pydantic model whose fields are the flags of ``metric-ds pseudo-label``.

Like the training config (:mod:`metric_ds.config`), every field holds its type, default and bounds in one place,
and every bad value is reported at once, as a :class:`~metric_ds.errors.UserError` whose messages name the flag:
``--min-purity must be in [0, 1], got 1.5``.
"""
from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

from metric_ds.data.prepare import METRIC_MASK_CHOICES
from metric_ds.errors import UserError

_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def flag(name: str) -> str:
    """The command-line flag of a field: ``min_purity`` -> ``--min-purity``."""
    return "--" + name.replace("_", "-")


def interval(field: FieldInfo) -> str:
    """A field's bounds as a reader writes them: ``in [0, 1]``, ``in (0, 1)``, ``>= 1``."""
    bounds = {key: getattr(m, key) for m in field.metadata for key in ("ge", "gt", "le", "lt") if hasattr(m, key)}
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
    return " and ".join(f"{_SIGNS[key]} {value}" for key, value in bounds.items())


class FlagModel(BaseModel):
    """A frozen model whose fields are command-line flags; construction raises one :class:`UserError` with a
    message per bad field, each naming its flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise UserError([type(self).describe(err) for err in exc.errors()]) from None

    @classmethod
    def describe(cls, err: Any) -> str:
        """One pydantic error as a message that names the flag and the value given."""
        name = str(err["loc"][0]) if err["loc"] else "<settings>"
        field, got = cls.model_fields.get(name), err.get("input")
        if field is None:
            return f"{name}: unknown setting; known: {', '.join(cls.model_fields)}"
        if err["type"] in _BOUNDS:
            return f"{flag(name)} must be {interval(field)}, got {got}"
        if err["type"] == "literal_error":
            return f"{flag(name)} must be one of {', '.join(get_args(field.annotation))}, got {got!r}"
        if err["type"] == "value_error":
            return f"{flag(name)} {err['ctx']['error']}"
        return f"{flag(name)}: {err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"


class Settings(FlagModel):
    """How rows are pseudo-labelled (the thresholds that the summary records); see :mod:`metric_ds.pseudo_label`."""

    method: Literal["kmeans", "knn"] = Field(
        "kmeans", description="k-means clusters with a purity threshold, or a vote of the labelled neighbours")
    k_multiple: int = Field(2, ge=1, description="kmeans: k = N x the number of classes")
    min_purity: float = Field(
        0.8, ge=0, le=1, description="kmeans: least share of a cluster's labelled rows that carry its majority label")
    min_labelled: int = Field(2, ge=1, description="kmeans: least labelled rows in a cluster")
    neighbours: int = Field(10, ge=1, description="knn: labelled neighbours that vote")
    margin: float = Field(0.3, ge=0, le=1, description="knn: least lead of the top label's vote share over the runner-up's")
    metric_mask: Literal[METRIC_MASK_CHOICES] = Field(  # prepare's choices: one home
        METRIC_MASK_CHOICES[0], description="all: SupCon on labelled and pseudo-labelled rows; labelled: on the labelled rows only "
                           "(pseudo-labelled rows are then left out, as in prepare)")
    holdout_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of labelled rows hidden and pseudo-labelled to estimate the precision")
    labelled_share: float | None = Field(
        None, gt=0, lt=1, description="repeat the labelled rows until they are about this share of the output (e.g. "
                                      "0.5), so that every batch holds some; then give train a validation table "
                                      "(data.val_path)")
    keep_unassigned: bool = Field(
        False, description="keep the rows that could not be pseudo-labelled, as label-free rows (label empty, "
                           "metric_mask 1, classifier_mask 0: SupCon with a second view of themselves), instead of "
                           "leaving them out")
    seed: int = 0

    @field_validator("keep_unassigned")
    @classmethod
    def _supcon_rows(cls, keep: bool, info: ValidationInfo) -> bool:
        if keep and info.data.get("metric_mask") == "labelled":
            raise ValueError("keeps rows for SupCon, which --metric-mask labelled restricts to labelled rows; "
                             "use --metric-mask all, or leave --keep-unassigned out")
        return keep

    def thresholds(self) -> dict[str, Any]:
        """The settings as plain data, in field order (a subclass's extra fields left out)."""
        return {name: getattr(self, name) for name in Settings.model_fields}


METHODS: tuple[str, ...] = get_args(Settings.model_fields["method"].annotation)
