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

.PHONY: install demo test bench quality cuda-build gpu-check clean

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

# pytest exits 5 when it collects no test, which fails this target (and so CI). Then the numerical tests again with
# torch's scalar CPU kernels, which round and sum in another order than the vectorized ones (AVX2 here, AVX-512 on
# an Intel Xeon): a tolerance picked from one machine's rounding fails there (tests/float_error.py).
NUMERIC_TESTS := $(addprefix tests/,test_rules.py test_factored_rules.py test_lion.py test_update_ops.py \
	test_fused.py test_chunked_loss.py test_tokens.py test_int8_weights.py test_int8_update_op.py test_update_rows_op.py test_embedding_rows.py \
	test_blocks_op.py test_quant_op.py)
test: install
	$(PY) -m pytest -q
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -p no:cacheprovider -k "not compiles" $(NUMERIC_TESTS)

# The CUDA build, compiled and linked as a whole on a machine with nvcc but no GPU (CI runs this after `test`):
# a CUDA build of torch in its own venv, the whole extension (kernels and bindings) built against it, then the
# suite run against that torch on the CPU. The venv borrows .venv's pure-Python packages through a .pth file
# (appended after its own site-packages, so its torch wins) instead of downloading them again.
#   CUDA_TORCH_SPEC   torch to build against (default torch==2.14.1: CUDA 13.0, as the machine's nvcc)
#   CUDA_ARCH         TORCH_CUDA_ARCH_LIST for the build (no GPU to detect one from)
# CUDA_HOME is where nvcc really lives (PATH may hold a wrapper script); CPATH adds the CUDA library headers of
# torch's wheels (cuBLAS, cuSPARSE, ...), which torch's ATen/cuda headers include and a compiler-only toolkit lacks.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_ARCH ?= 8.0
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_LIB := build/cuda/lib
SITE := import site; print(site.getsitepackages()[0])
# Tests of the installed layout (console script, recipes beside the package) that a build folder lacks; `make test`
# runs them.
NEEDS_INSTALL := $(addprefix --deselect tests/,test_cli.py::test_console_script_is_installed \
	test_cli.py::test_ls_and_cp test_cli.py::test_train_shipped_recipe_by_name_then_eval \
	test_config.py::test_shipped_recipes_all_load test_cli.py::test_a_wheel_install_lists_and_copies_the_recipes_and_ships_the_model_configs)

cuda-build: install
	@command -v nvcc >/dev/null || { echo "cuda-build: nvcc not found on PATH (install the CUDA toolkit)"; exit 1; }
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -c "import torch" 2>/dev/null || $(CUDA_PY) -m pip install -q "$(CUDA_TORCH_SPEC)" "setuptools>=68" wheel ninja
	$(PY) -c "$(SITE)" > "$$($(CUDA_PY) -c "$(SITE)")/lowmem-main-venv.pth"
	CUDA_HOME="$$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p')" \
	CPATH="$$($(CUDA_PY) -c "import os, nvidia, torch; print(os.path.join(list(nvidia.__path__)[0], 'cu' + torch.version.cuda.split('.')[0], 'include'))")" \
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCH)" $(CUDA_PY) setup.py -q build --build-base build/cuda --build-lib $(CUDA_LIB)
	PYTHONSAFEPATH=1 PYTHONPATH=$(CUDA_LIB) LOWMEM_JIT=0 $(CUDA_PY) -c "import torch; from lowmem.ops.native import ensure_loaded; s = ensure_loaded(); assert s.source == 'prebuilt' and s.with_cuda, s; print('lowmem._C with CUDA kernels, against torch', torch.__version__)"
	PYTHONSAFEPATH=1 PYTHONPATH=$(CUDA_LIB) LOWMEM_JIT=0 $(CUDA_PY) -m pytest -q -p no:cacheprovider tests $(NEEDS_INSTALL)

# On a GPU machine, offline, with torch (CUDA) and nvcc installed: build lowmem._C with CUDA against that torch,
# run the cuda-marked tests, then the GPU benchmark (benchmarks/bench_gpu.py; rows go to benchmarks/results.csv).
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) setup.py -q build_ext --inplace
	$(GPU_PY) -c "import torch; from lowmem.ops.native import ensure_loaded; s = ensure_loaded(); assert torch.cuda.is_available() and s.with_cuda, s; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, s.source)"
	$(GPU_PY) -m pytest -q -p no:cacheprovider -m cuda tests
	$(GPU_PY) benchmarks/bench_gpu.py
	$(GPU_PY) benchmarks/bench_gpu.py --cap 16 --only "recipe llama3-8b-adalomo-int8-16gb,lowmem fused+adalomo int8w"
	$(GPU_PY) benchmarks/bench_gpu.py --cap 24 --only "recipe qwen2.5-14b-adalomo-int8-24gb"

# On a quiet machine: a benchmark beside another process on 2 cores runs ~10x slower.
bench: install
	$(PY) -m pip install -q --no-deps lomo-optim lion-pytorch
	cd benchmarks && ../$(PY) bench_quant.py && ../$(PY) bench_update_ops.py && ../$(PY) bench_int8_update.py && ../$(PY) bench_update_rows.py && ../$(PY) bench_strategies.py

# The quality benchmark: every method against AdamW on the stdlib docstring task (lr sweep, 3 seeds), about an hour on
# 2 cores, resumable; its table goes to README (Quality). `make quality QUALITY_ARGS=--quick`: a few minutes.
quality: install
	$(PY) benchmarks/bench_quality.py $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) $(CUDA_VENV) build *.egg-info lowmem/_C*.so outputs
