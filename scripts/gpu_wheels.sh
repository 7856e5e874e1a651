#!/usr/bin/env bash
# `make gpu-wheels`: fill .whl/ (git-ignored) with the Python 3.12 x86_64 wheels that the lent GPU machine lacks,
# so that scripts/gpu_check.sh can install them there with no network:
#   pip install --no-index --find-links .whl deepspeed pydantic
#
# That machine has torch 2.11 (CUDA 13), transformers 5.17, numpy, pandas, pyarrow, pyyaml, tqdm, safetensors,
# ninja, pybind11, einops, msgpack, psutil, py-cpuinfo, packaging and typing-extensions
# (/work/.library/device/KINDS.md), but neither DeepSpeed nor pydantic. The versions are those of this machine's
# .venv, so the GPU runs what the tests here ran. DeepSpeed is built here with DS_BUILD_OPS=0: no compiled ops,
# a pure-Python wheel that works on Python 3.12. metric_ds itself needs no wheel: gpu_check.sh builds the op in the
# copied source tree. Fails if .whl/ ends up over 40 MiB (the device machine takes 64 MiB per call in all).
#
# Usage: scripts/gpu_wheels.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DEST=.whl
LIMIT_MIB=40

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf "$DEST"
mkdir -p "$DEST"
# Binary and pure-Python dependencies, for CPython 3.12 on x86_64 Linux (manylinux tags from old to new).
PLATFORMS=()
for tag in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
           manylinux_2_34_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
SPECS=()
for pkg in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson; do
  SPECS+=("$pkg==$(version "$pkg")")
done
echo "gpu-wheels: downloading ${SPECS[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${SPECS[@]}"

# DeepSpeed from its sdist, without its C++/CUDA ops (they would JIT-build on first use; metric_ds uses none).
DS="deepspeed==$(version deepspeed)"
echo "gpu-wheels: building $DS with DS_BUILD_OPS=0"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$DEST" "$DS"
ls "$DEST"/deepspeed-*-py3-none-any.whl >/dev/null || { echo "gpu-wheels: DeepSpeed did not build as a pure wheel"; exit 1; }

size=$(du -sb "$DEST" | cut -f1)
mib=$((size / 1048576))
ls -l "$DEST"
echo "gpu-wheels: $(ls "$DEST" | wc -l) wheels, ${mib} MiB in $DEST"
if [ "$size" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu-wheels: $DEST is over ${LIMIT_MIB} MiB"
  exit 1
fi
