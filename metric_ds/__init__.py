"""metric_ds: joint CE + SupCon training of text encoders.

``metric_ds.load(path)`` loads a trained model as a :class:`~metric_ds.inference.LoadedModel` (see
:mod:`metric_ds.inference`); it and the names below are imported on first use, so ``import metric_ds`` stays
cheap. ``MetricModel`` and ``Bank`` are the deprecated names of ``LoadedModel`` and ``ReferenceSet``.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["KnnResult", "LoadedModel", "Predictions", "ReferenceSet", "load"]
_DEPRECATED = ("MetricModel", "Bank")


def __getattr__(name: str) -> Any:
    if name in __all__ or name in _DEPRECATED:
        return getattr(importlib.import_module("metric_ds.inference"), name)
    raise AttributeError(f"module 'metric_ds' has no attribute {name!r}")
