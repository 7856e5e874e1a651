"""Data warnings: logged on the ``metric_ds`` logger and, when the caller asks, collected for a summary."""
from __future__ import annotations

import logging

log = logging.getLogger("metric_ds")


def warn(message: str, sink: list[str] | None = None) -> None:
    """Log ``message`` at WARNING on the ``metric_ds`` logger and append it to ``sink`` if one is given."""
    log.warning("%s", message)
    if sink is not None:
        sink.append(message)
