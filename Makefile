# Everything a newcomer needs, from a fresh clone:
#   make test    set up .venv (torch if missing), build, run the tests
#                (all but tests/test_cuda_emu.py, which `make test-cuda-emu` runs)
#   make bench   same set-up, then print the benchmark tables
# CPU_TORCH picks the torch that `make` installs when .venv has none; the
# default is PyPI's torch. CI pins the CPU build: CPU_TORCH=torch==2.13.0.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_TORCH ?= torch
# The CUDA build check (`make cuda-check`): a CUDA build of torch and nvcc.
VENV_CUDA ?= .venv-cuda
PY_CUDA := $(VENV_CUDA)/bin/python
CUDA_TORCH ?= torch==2.14.1
# Installed beside it for the Triton-interpreter and model-conversion tests
# (transformers: MODEL_EXTRAS below, its own stamp).
CUDA_EXTRAS ?= torchvision==0.29.1 segmentation-models-pytorch==0.6.0
# And for the export tests (tests/test_export.py: ONNX in onnxruntime and OpenVINO).
EXPORT_EXTRAS ?= onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 openvino==2026.4.1
# And for converting transformers' UperNet and SegFormer (tests/test_convert.py,
# tests/test_export.py, `make bench-models`).
MODEL_EXTRAS ?= transformers==5.24.0
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS ?= 2
PYTEST_ARGS ?=
# PYTEST_WORKERS=N runs the test stages that allow it (the CPU suite and the
# CUDA-environment tests) in N processes with pytest-xdist, which `make`
# then installs into the venvs (a stamp each). Unset: one process, nothing
# installed. CI sets 2.
PYTEST_WORKERS ?=
XDIST_ARGS := $(if $(PYTEST_WORKERS),-n $(PYTEST_WORKERS))

.PHONY: compat-check no-extension-yet test test-long test-large fuzz bench bench-models build venv cuda-check cuda-venv test-cuda-env test-cuda-emu gpu-check clean \
  cuda-env-tests cuda-env-export-tests cuda-env-properties

$(VENV)/.ready:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(CPU_TORCH)"
	$(PY) -m pip install -q numpy ninja pytest pytest-benchmark hypothesis matplotlib setuptools wheel
	touch $@

# A separate stamp, so an existing .venv gets the property tests' hypothesis too.
$(VENV)/.hypothesis-ready: $(VENV)/.ready
	$(PY) -m pip install -q hypothesis
	touch $@

$(VENV)/.xdist-ready: $(VENV)/.ready
	$(PY) -m pip install -q pytest-xdist
	touch $@

venv: $(VENV)/.ready $(VENV)/.hypothesis-ready $(if $(PYTEST_WORKERS),$(VENV)/.xdist-ready)

# Builds the extension in place against .venv's torch (editable install),
# only when a source or the venv is newer than the last build: pip rebuilds
# every object from scratch (about 90 s on 2 cores), and CI calls `build`
# once per stage. The stamp lives in build/, so `make clean` forces a rebuild.
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
BUILD_STAMP := build/.built-$(subst /,_,$(VENV))
$(BUILD_STAMP): $(VENV)/.ready $(VENV)/.hypothesis-ready $(EXT_SOURCES) $(if $(wildcard pyramid_ext/_C*.so),,no-extension-yet)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p $(@D) && touch $@

build: venv $(BUILD_STAMP)
	$(PY) -c "import pyramid_ext as pe; print('pyramid_ext', pe.build_info())"

test: build
	PYRAMID_EXT_REQUIRE_CPP=1 $(PY) -m pytest tests -q --ignore=tests/test_cuda_emu.py $(XDIST_ARGS) $(PYTEST_ARGS)

# The long runs (tests/test_long_run.py, marked `long`): 20,000 calls of each
# op, resident memory and Python object counts flat.
test-long: build
	PYRAMID_EXT_LONG=1 PYRAMID_EXT_REQUIRE_CPP=1 $(PY) -m pytest tests/test_long_run.py -q $(PYTEST_ARGS)

# The large tests (tests/test_precision.py, marked `large`): maps and outputs
# of more than 2^31 elements (average pooling within 1e-6 of fp64, max
# pooling indices past 2^31, upsample_concat); 12.4 GB of memory at peak,
# about 75 s on 2 cores. THP: the first touch of 8.6 GB of fresh memory is
# much faster with it.
test-large: build
	THP_MEM_ALLOC_ENABLE=1 PYRAMID_EXT_LARGE=1 PYRAMID_EXT_REQUIRE_CPP=1 $(PY) -m pytest tests/test_precision.py -q -m large $(PYTEST_ARGS)

# The property-based tests with many more random examples (a new seed each
# run; a failure prints the --hypothesis-seed=N that reproduces it).
# FUZZ_PROFILE=ci reruns CI's fixed examples.
FUZZ_PROFILE ?= fuzz
fuzz: build
	HYPOTHESIS_PROFILE=$(FUZZ_PROFILE) PYRAMID_EXT_REQUIRE_CPP=1 $(PY) -m pytest tests/test_properties.py -q $(PYTEST_ARGS)

bench: build
	$(PY) benchmarks/compare.py --both-env
	$(PY) -m pyramid_ext bench
	$(PY) benchmarks/bench_models.py --both-env
	$(MAKE) bench-models

# The model table (`python -m pyramid_ext bench --model all`: transformers UperNet
# and SegFormer, the PSPNet head, smp PSPNet, torchvision DeepLabV3; whole model
# and decode head, eager vs converted) needs the libraries, which live in the
# CUDA-build environment: a CPU build of the extension for its torch, in a copy
# of the tree (build/models-bench; incremental), then the benchmark.
MODELS_TREE := build/models-bench
BENCH_MODELS_ARGS ?= --rounds 5
bench-models: cuda-venv
	mkdir -p $(MODELS_TREE)
	tar --exclude=./.venv --exclude=./$(VENV_CUDA) --exclude=./build --exclude='*.so' --exclude=./.git -cf - . | tar -xf - -C $(MODELS_TREE)
	cd $(MODELS_TREE) && FORCE_CUDA=0 MAX_JOBS=$(MAX_JOBS) $(abspath $(PY_CUDA)) setup.py -q build_ext --inplace
	cd $(MODELS_TREE) && PYTHONPATH=. $(abspath $(PY_CUDA)) -m pyramid_ext bench --model all $(BENCH_MODELS_ARGS)

$(VENV_CUDA)/.ready:
	test -x $(PY_CUDA) || $(PYTHON) -m venv $(VENV_CUDA)
	$(PY_CUDA) -m pip install -q "$(CUDA_TORCH)" $(CUDA_EXTRAS) numpy ninja pytest hypothesis setuptools wheel
	touch $@

# A separate stamp, so an existing .venv-cuda gets them too.
$(VENV_CUDA)/.export-ready: $(VENV_CUDA)/.ready
	$(PY_CUDA) -m pip install -q $(EXPORT_EXTRAS)
	touch $@

$(VENV_CUDA)/.hypothesis-ready: $(VENV_CUDA)/.ready
	$(PY_CUDA) -m pip install -q hypothesis
	touch $@

$(VENV_CUDA)/.models-ready: $(VENV_CUDA)/.ready
	$(PY_CUDA) -m pip install -q $(MODEL_EXTRAS)
	touch $@

$(VENV_CUDA)/.xdist-ready: $(VENV_CUDA)/.ready
	$(PY_CUDA) -m pip install -q pytest-xdist
	touch $@

cuda-venv: $(VENV_CUDA)/.ready $(VENV_CUDA)/.export-ready $(VENV_CUDA)/.hypothesis-ready $(VENV_CUDA)/.models-ready \
  $(if $(PYTEST_WORKERS),$(VENV_CUDA)/.xdist-ready)

# Compiles the CUDA kernels (no GPU needed: FORCE_CUDA=1), warnings as errors,
# in a copy of the tree so the CPU build in place is left alone; then checks
# that every op has a CUDA kernel and runs tests/test_cuda.py (which needs a GPU
# to do more than skip).
CUDA_TREE := build/cuda-check
cuda-check: cuda-venv
	rm -rf $(CUDA_TREE) && mkdir -p $(CUDA_TREE)
	tar --exclude=./.venv --exclude=./$(VENV_CUDA) --exclude=./build --exclude='*.so' --exclude=./.git -cf - . | tar -xf - -C $(CUDA_TREE)
	cd $(CUDA_TREE) && CUDA_HOME=$(CUDA_HOME) FORCE_CUDA=1 PYRAMID_EXT_WERROR=1 MAX_JOBS=$(MAX_JOBS) \
	  TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" \
	  CPATH="$$($(abspath $(PY_CUDA)) -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))')" \
	  $(abspath $(PY_CUDA)) setup.py -q build_ext --inplace
	cd $(CUDA_TREE) && PYTHONPATH=. $(abspath $(PY_CUDA)) tests/check_cuda_build.py

CUDA_ENV_TESTS := tests/test_triton.py tests/test_triton_compile.py tests/test_double_backward.py tests/test_convert.py tests/test_nn.py \
  tests/test_cuda.py tests/test_bad_input.py tests/test_distributed.py tests/test_long_run.py \
  tests/test_library.py tests/test_plan.py tests/test_train_step.py
CUDA_ENV_EXPORT_TESTS := tests/test_export.py
CUDA_ENV_PYTEST = PYTHONPATH=. TRITON_INTERPRET=1 PYRAMID_EXT_REQUIRE_CPP=1 \
  $(abspath $(PY_CUDA)) -m pytest -q $(XDIST_ARGS) $(PYTEST_ARGS)
# The tests that need the CUDA-build environment: Triton kernels on CPU
# tensors under the interpreter, conversion of torchvision/smp/transformers models, export
# (ONNX, torch.export, AOTInductor; PYRAMID_EXT_REQUIRE_EXPORT=1 makes a missing
# onnx/onnxruntime/openvino fail rather than skip) and the GPU suite (skips
# without a GPU). Uses the extension cuda-check built.
test-cuda-env: cuda-check
	cd $(CUDA_TREE) && PYRAMID_EXT_REQUIRE_EXPORT=1 $(CUDA_ENV_PYTEST) $(CUDA_ENV_TESTS) $(CUDA_ENV_EXPORT_TESTS)
	cd $(CUDA_TREE) && $(CUDA_ENV_PYTEST) tests/test_properties.py -k triton

# The same tests in three parts, on the tree and build `make cuda-check` left
# (no rebuild): CI runs them side by side (.ci/run).
cuda-env-tests:
	cd $(CUDA_TREE) && PYRAMID_EXT_REQUIRE_EXPORT=1 $(CUDA_ENV_PYTEST) $(CUDA_ENV_TESTS)
cuda-env-export-tests:
	cd $(CUDA_TREE) && PYRAMID_EXT_REQUIRE_EXPORT=1 $(CUDA_ENV_PYTEST) $(CUDA_ENV_EXPORT_TESTS)
cuda-env-properties:
	cd $(CUDA_TREE) && $(CUDA_ENV_PYTEST) tests/test_properties.py -k triton

# The CUDA kernels of csrc/cuda/ compiled by the host compiler against the CUDA
# emulator (csrc/cuda_emu/) and run on CPU tensors: tests/test_cuda_emu.py
# builds the test-only module (cached in build/cuda-emu; a planted-bug build in
# build/cuda-emu-bug1) against .venv's torch. No GPU or nvcc needed.
test-cuda-emu: venv
	MAX_JOBS=$(MAX_JOBS) PYTHONPATH=. $(PY) -m pytest tests/test_cuda_emu.py -q $(PYTEST_ARGS)

# Every source compiled (syntax only) against another torch release's headers:
# COMPAT_TORCH, default torch 2.11, the GPU machines' image (.ci/compat-check).
COMPAT_TORCH ?= 2.11.0
compat-check: venv
	PY=$(PY) COMPAT_TORCH=$(COMPAT_TORCH) CUDA_HOME=$(CUDA_HOME) \
	  CUDA_INCLUDE="$$(test -x $(PY_CUDA) && $(PY_CUDA) -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))' 2>/dev/null || true)" \
	  bash .ci/compat-check

# On a machine with a CUDA GPU: build for its architecture, run the GPU tests
# and the Triton tests on CUDA tensors, print the benchmark table for the GPU;
# everything goes to $(GPU_RESULTS) (and the timings to its .json twin).
GPU_RESULTS ?= build/gpu-check-results.txt
GPU_BENCH_OPS ?= avg.fwd.nchw,avg.fwdbwd.nchw,uc.fresh.nchw,uc.fwdbwd.nchw
GPU_BENCH_SHAPES ?= 1x2048x64x64,4x512x60x60,8x512x32x32,16x2048x64x64
GPU_BENCH_ROUNDS ?= 10
GPU_MAX_JOBS ?= 8
# GPU_PY: an interpreter that already has a CUDA torch (a GPU machine's image
# with no package index: `make gpu-check GPU_PY=python3`); no venv is made.
GPU_PY ?=
gpu-check: $(if $(GPU_PY),,cuda-venv)
	PY_CUDA=$(or $(GPU_PY),$(PY_CUDA)) CUDA_HOME=$(CUDA_HOME) TREE=build/gpu-check RESULTS=$(GPU_RESULTS) MAX_JOBS=$(GPU_MAX_JOBS) \
	  BENCH_OPS="$(GPU_BENCH_OPS)" BENCH_SHAPES="$(GPU_BENCH_SHAPES)" BENCH_ROUNDS=$(GPU_BENCH_ROUNDS) bash .ci/gpu-check

clean:
	rm -rf build *.egg-info pyramid_ext/*.so
