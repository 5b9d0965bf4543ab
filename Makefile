# Everything from a fresh clone: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv, install torch without pulling a CUDA build on a CPU machine, build lowmem's
# extension against that torch, and run.
#   TORCH_SPEC   which torch to install when .venv has none (default: torch==2.13.0; on a CPU machine
#                without a local wheel add TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu)
#   PYTHON       the interpreter that creates .venv
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowmem-installed
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=68" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "from lowmem.ops.native import ensure_loaded; s = ensure_loaded(); print('lowmem native ops:', s.source)"
	touch $(STAMP)

demo: install
	$(VENV)/bin/lowmem train recipes/tiny-llama-pydoc.yaml

# pytest exits 5 when it collects no test, which fails this target (and so CI).
test: install
	$(PY) -m pytest -q

# On a quiet machine: a benchmark beside another process on 2 cores runs ~10x slower.
bench: install
	$(PY) -m pip install -q --no-deps lomo-optim lion-pytorch
	cd benchmarks && ../$(PY) bench_quant.py && ../$(PY) bench_update_ops.py && ../$(PY) bench_strategies.py

clean:
	rm -rf $(VENV) build *.egg-info lowmem/_C*.so outputs
