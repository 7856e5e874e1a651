#!/usr/bin/env python
"""Compatibility shim for users of the older module: ``python train_metric_classifier.py --config F``.

It is ``metric-ds train --config F`` (and accepts the same ``--set`` overrides).
"""
import sys

from metric_ds.train import main

if __name__ == "__main__":
    sys.exit(main())
