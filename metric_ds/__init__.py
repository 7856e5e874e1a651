"""metric_ds: joint CE + SupCon training of text encoders.

``metric_ds.load(path)`` loads a trained model (see :mod:`metric_ds.inference`); it is imported on first use, so
``import metric_ds`` stays cheap.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from metric_ds.inference import load

        return load
    raise AttributeError(f"module 'metric_ds' has no attribute {name!r}")
