# `make serve` and `make test` work on a fresh machine: each (re)creates the virtualenv only
# when pyproject.toml changed, builds llama-cpp-python once per build configuration (cached
# outside the repo), generates the demo models if absent, then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE_DIR ?= $(HOME)/.cache/nika-serve

# vLLM: the CUDA build where a GPU is present, else the CPU build. PyPI's torchvision,
# torchaudio and torchcodec wheels (vLLM dependencies) are CUDA builds whose native
# libraries fail to load beside CPU torch, and a torchvision that fails to import breaks
# even `from transformers import LlamaConfig`. Nothing on our CPU path needs them (the demo
# VLM is Idefics3, whose transformers and vLLM code never imports torchvision), so CPU
# installs remove them.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
VISION_EXTRA := $(if $(GPU),vision-gpu,vision-cpu)
CUDA_ONLY_WHEELS := torchvision torchaudio torchcodec

# llama.cpp CPU build: a portable x86-64 baseline (AVX2/FMA/F16C), never -march=native.
# A native build here enables AVX512/AMX and segfaults in decode on every quantized model;
# and a wheel built natively on one node can crash on another node of a cluster.
LLAMA_VERSION := 0.3.36
# Where a GPU is present (a GPU node of a cluster), the same baseline plus CUDA: GGUF replicas there
# offload every layer (cluster/serve_config.gpu.yaml).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAVA_BUILD=OFF$(if $(GPU), -DGGML_CUDA=ON)
LLAMA_BUILD_ID := $(LLAMA_VERSION)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha1sum | cut -c1-10)
LLAMA_WHEEL_DIR := $(CACHE_DIR)/wheels/llama-cpp-python-$(LLAMA_BUILD_ID)
LLAMA_WHEEL := $(LLAMA_WHEEL_DIR)/.built
# The benchmarks' peers: llama.cpp's own server (and llama-batched-bench beside it), from the
# llama.cpp sources vendored in the same llama-cpp-python sdist, with the same flags, so both
# sides run the same kernels.
LLAMA_SERVER := $(CACHE_DIR)/llama-server-$(LLAMA_BUILD_ID)/bin/llama-server
INSTALLED := $(VENV)/.installed
DEMO_MODELS := models/tiny-llama-Q4_K_M.gguf models/medium-llama-Q4_K_M.gguf models/tiny-embed-Q8_0.gguf \
	models/tiny-idefics3/config.json

# Environment of the Ray that `serve run`, the tests and the benchmarks start on this machine:
# deployments/constants.py LOCAL_ENV says why (tests/unit/test_cluster_files.py keeps this copy equal to it).
export RAY_SERVE_PROXY_USE_GRPC := 1
export RAY_SERVE_ENABLE_DIRECT_INGRESS := 1
export RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT := 30000
export RAY_SERVE_PORT_QUARANTINE_S := 0
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S := 1

.PHONY: install models serve lint test bench clean

install: $(INSTALLED)

$(LLAMA_WHEEL):
	@echo "Building llama-cpp-python $(LLAMA_VERSION) ($(LLAMA_CMAKE_ARGS)); ~5-9 min once, then cached in $(LLAMA_WHEEL_DIR)"
	mkdir -p $(LLAMA_WHEEL_DIR)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PYTHON) -m pip wheel --no-deps \
		--no-binary llama-cpp-python --no-cache-dir -w $(LLAMA_WHEEL_DIR) "llama-cpp-python==$(LLAMA_VERSION)"
	touch $@

$(LLAMA_SERVER):
	@echo "Building llama-server from llama-cpp-python $(LLAMA_VERSION)'s sources ($(LLAMA_CMAKE_ARGS)); once, cached"
	rm -rf $(@D)/../src && mkdir -p $(@D)/../src
	$(PYTHON) -m pip download --no-deps --no-binary :all: -d $(@D)/../src "llama-cpp-python==$(LLAMA_VERSION)"
	tar -xzf $(@D)/../src/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $(@D)/../src
	cmake -S $(@D)/../src/llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp -B $(@D)/../build -DCMAKE_BUILD_TYPE=Release \
		$(LLAMA_CMAKE_ARGS) -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
	cmake --build $(@D)/../build --target llama-server llama-batched-bench -j $$(nproc)
	mkdir -p $(@D) && cp $(@D)/../build/bin/llama-batched-bench $(@D)/ && cp $(@D)/../build/bin/llama-server $@
	rm -rf $(@D)/../src $(@D)/../build

$(INSTALLED): pyproject.toml $(LLAMA_WHEEL)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_INSTALL_ARGS) --find-links $(LLAMA_WHEEL_DIR) --only-binary llama-cpp-python \
		-e '.[dev,bench,$(VISION_EXTRA)]'
	$(if $(GPU),,$(PY) -m pip uninstall -y $(CUDA_ONLY_WHEELS))
	touch $@

$(DEMO_MODELS) &: | $(INSTALLED)
	$(PY) -m deployments.demo_models --dir models

models: $(DEMO_MODELS)

serve: install models
	$(PY) -m deployments.config --local serve_config.yaml
	$(VENV)/bin/serve run serve_config.yaml

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Lint first, then the three tiers in order: unit (no Ray), serve (fake engine), e2e (real engines).
test: lint models
	$(PY) -m pytest $(PYTEST_ARGS)

# Every comparison in benchmarks/ (README there); results go to benchmarks/results/.
bench: install models $(LLAMA_SERVER)
	LLAMA_SERVER=$(LLAMA_SERVER) $(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) models .pytest_cache
