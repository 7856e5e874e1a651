"""Build script: the package, plus the fused SupCon op (the logic lives in metric_ds/ops/build.py)."""
import importlib.util
from pathlib import Path

from setuptools import setup

_spec = importlib.util.spec_from_file_location("_md_build", Path(__file__).parent / "metric_ds" / "ops" / "build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)
_build.resolve_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME (at its import) or guesses it

from torch.utils.cpp_extension import BuildExtension

setup(ext_modules=_build.extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
