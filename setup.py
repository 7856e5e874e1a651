"""Build script: the package, plus the fused SupCon op (see metric_ds/ops/build.py)."""
from setuptools import setup

setup()
