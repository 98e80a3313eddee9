# mmgpt_engine: `make test` and `make train` on a fresh machine (each creates .venv when missing).
# `make gpu-check` is for the offline GPU machine: its own python3, no venv, no installs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.mmgpt-installed
# Where pip is capped to the CUDA-13 torch on local disk (these machines) take that one;
# elsewhere a torch already visible to the venv (--system-site-packages) is kept.
TORCH_SPEC ?= $(if $(wildcard /etc/xdg/pip/constraints.txt),torch==2.14.1,torch>=2.4)
# CUDA toolkit root: the nvcc on PATH may be a wrapper script, so ask nvcc itself.
CUDA_HOME ?= $(shell nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^\#\$$ TOP=//p' | head -1 | xargs -r realpath)
export CUDA_HOME
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export TORCH_CUDA_ARCH_LIST
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
# Triton kernels run interpreted on CPU tensors where there is no GPU.
ifeq ($(HAS_GPU),0)
TEST_ENV := TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
TRAIN_LAUNCH := DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --num_gpus 2
else
TEST_ENV :=
TRAIN_LAUNCH := $(VENV)/bin/deepspeed --num_gpus $(NGPU)
endif
PYTEST_ARGS ?=
TRAIN_ARGS ?=
OUT ?= benchmarks/results
# NVIDIA compute-sanitizer: the toolkit's bin/ or its own folder, else PATH (empty when absent)
SANITIZER ?= $(firstword $(wildcard $(CUDA_HOME)/bin/compute-sanitizer $(CUDA_HOME)/compute-sanitizer/compute-sanitizer) \
  $(shell command -v compute-sanitizer 2>/dev/null))

.PHONY: install test train train-vlm gpu-check bench clean

$(VPY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml setup.py | $(VPY)
	$(VPY) -m pip install -q 'setuptools>=64' wheel
	$(VPY) -c 'import torch' 2>/dev/null || $(VPY) -m pip install -q '$(TORCH_SPEC)'
	MMGPT_BUILD_CUDA=0 $(VPY) -m pip install -q --no-build-isolation -e '.[dev]'
	$(VPY) -m mmgpt_engine.ops.cpu --build || echo "the CPU kernels did not build: the torch backend keeps its plain-PyTorch route"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(VPY) -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

train: $(STAMP)
	$(TRAIN_LAUNCH) --module mmgpt_engine.train $(TRAIN_ARGS)

# LLaVA's two stages on tiny towers made here (runs/vlm/towers) and the built-in shapes as
# conversations (runs/vlm/data): stage 1 trains the connector on captions, stage 2 the connector and
# the language model on questions and answers, then reports the answer accuracy with and without images.
VLM_SAMPLES ?= 8000
train-vlm: $(STAMP)
	$(VPY) -m mmgpt_engine.train.demo_towers --out runs/vlm/towers
	for stage in 1 2; do \
	  $(VPY) -m mmgpt_engine.data.shapes_chat --out runs/vlm/data --stage $$stage --samples $(VLM_SAMPLES) --split train && \
	  $(VPY) -m mmgpt_engine.data.shapes_chat --out runs/vlm/data --stage $$stage --samples 256 --split val || exit 1; \
	done
	$(TRAIN_LAUNCH) --module mmgpt_engine.train --config configs/vlm/tiny_stage1.yaml \
	  --deepspeed_config configs/llava/zero2.json --resume none --overwrite_output_dir $(TRAIN_ARGS)
	$(TRAIN_LAUNCH) --module mmgpt_engine.train --config configs/vlm/tiny_stage2.yaml \
	  --deepspeed_config configs/llava/zero3.json --resume none --overwrite_output_dir $(TRAIN_ARGS)

# On the lent GPU machine: build csrc/ for the card, run the GPU tests, the sanitizers and the quick
# benchmark sweep; everything written lands in $(OUT).
gpu-check:
	mkdir -p $(OUT)
	TORCH_CUDA_ARCH_LIST=$${GPU_ARCH:-9.0} python3 -m mmgpt_engine.ops.cuda --build 2>&1 | tee $(OUT)/build.log
	python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee $(OUT)/pytest-gpu.log; \
	  echo "pytest -m gpu exit: $${PIPESTATUS[0]}" | tee -a $(OUT)/pytest-gpu.log
	@if [ -z "$(SANITIZER)" ]; then echo "compute-sanitizer: not found in $(CUDA_HOME) or on PATH; sanitizers skipped" \
	  | tee $(OUT)/sanitize-memcheck.log $(OUT)/sanitize-racecheck.log; fi
	if [ -n "$(SANITIZER)" ]; then PYTORCH_NO_CUDA_MEMORY_CACHING=1 $(SANITIZER) --tool memcheck --error-exitcode 1 \
	  python3 -m benchmarks.cuda_sanitize 2>&1 | tee $(OUT)/sanitize-memcheck.log; \
	  echo "memcheck exit: $${PIPESTATUS[0]}" | tee -a $(OUT)/sanitize-memcheck.log; fi
	if [ -n "$(SANITIZER)" ]; then $(SANITIZER) --tool racecheck --error-exitcode 1 \
	  python3 -m benchmarks.cuda_sanitize norms attention 2>&1 | tee $(OUT)/sanitize-racecheck.log; \
	  echo "racecheck exit: $${PIPESTATUS[0]}" | tee -a $(OUT)/sanitize-racecheck.log; fi
	python3 -m benchmarks --quick --out $(OUT) 2>&1 | tee $(OUT)/bench.log

bench:
	$(VPY) -m benchmarks --out $(OUT)

clean:
	rm -rf build *.egg-info .pytest_cache
