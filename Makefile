# The two commands: `make demo` (the whole DAG on the embedded default) and `make test`.
# Both create .venv from nothing when it is missing and install the exact pins first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
# The third-party packages are built once per lock file, in $(ENV_CACHE)/py311-<hash of the
# lock>, so a fresh clone on a machine that already installed the same pins reuses them (a
# cache keyed by the lock file, as CI caches are). Installing the ~195 wheels takes minutes
# on our 2-core machines. That shared environment holds the locked packages only: each clone's
# .venv is a venv of its own layered over it (src/specmatch/ops/layered_env.py: the shared
# packages through a .pth, its console scripts re-pointed at .venv/bin/python) into which the
# clone alone is installed, so `specmatch` in one clone never runs another clone's code.
# `make ENV_CACHE=` builds a whole .venv in place instead.
ENV_CACHE ?= $(HOME)/.cache/specmatch/envs
LOCK_ID := $(shell cat requirements/lock.txt | sha256sum | cut -c1-16)
# Per clone: this checkout's .venv and its editable install are done.
STAMP  := .venv.stamp
# Made again whatever the stamp says: no .venv, a .venv of the earlier layout (a link to the
# shared environment, which held whichever clone installed itself last), or a layered one
# whose shared environment is gone.
VENV_STALE := $(shell { test ! -x $(VENV)/bin/python || test -L $(VENV) || { test -f $(VENV)/shared-env && \
  ! test -f "$$(cat $(VENV)/shared-env)/.complete"; }; } && echo FORCE)
export PATH := $(BIN):$(PATH)
# Single-threaded BLAS/OpenMP inside each job: the DAG already runs jobs in parallel.
JOBS ?= 2
# An extra local wheel folder for pip (find-links), used when it exists.
WHEELS ?= /opt/wheels
PIP_FLAGS := --quiet --disable-pip-version-check --no-compile $(if $(wildcard $(WHEELS)),--find-links $(WHEELS))
PIP_INSTALL := $(BIN)/python -m pip install $(PIP_FLAGS)

.PHONY: demo small test test-fast bench lint install lock clean-demo help build-env container FORCE

help:
	@echo "make demo       run the whole tiny DAG on the embedded default (CPU, minutes)"
	@echo "make small      the small preset: diffusion that makes images (about an hour on 2 CPU cores)"
	@echo "make test       run the test suite (installs .venv first)"
	@echo "make test-fast  the unit tests only (no end-to-end DAG runs)"
	@echo "make bench      run the benchmarks in bench/"
	@echo "make container  check and build the Apptainer image containers/specmatch.sif (needs apptainer)"
	@echo "make lock       re-resolve requirements/*.in into requirements/lock.txt"

# Only the line that calls $(MAKE) runs under `make -n` (as make does with every such line):
# the lines that replace .venv stay apart from it.
SHARED_ENV = $(ENV_CACHE)/py311-$(LOCK_ID)
$(STAMP): requirements/lock.txt pyproject.toml $(VENV_STALE)
	@if [ -z "$(ENV_CACHE)" ] && { [ -L $(VENV) ] || [ -f $(VENV)/shared-env ]; }; then rm -rf $(VENV); fi
	@if [ -n "$(ENV_CACHE)" ]; then \
	  test -f "$(SHARED_ENV)/.complete" || $(MAKE) --no-print-directory build-env ENV_DIR="$(SHARED_ENV)"; \
	else \
	  test -f $(VENV)/.complete || $(MAKE) --no-print-directory build-env ENV_DIR="$(CURDIR)/$(VENV)"; \
	fi
	@if [ -n "$(ENV_CACHE)" ]; then \
	  rm -rf $(VENV) && "$(SHARED_ENV)/bin/python" -I src/specmatch/ops/layered_env.py "$(SHARED_ENV)" $(VENV); \
	fi
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	@touch $@

FORCE:

# Internal: a complete environment at ENV_DIR from the lock (--no-deps: the lock is the whole
# closure, so pip need not resolve). Byte-compiled once on all cores (pip's own compile step is
# single-threaded): with PYTHONDONTWRITEBYTECODE set, as on CI, every process would otherwise
# recompile torch's sources at import (tens of seconds per stage command). `.complete` is
# written last, so an interrupted build is started again, never used.
build-env:
	@test -n "$(ENV_DIR)" || { echo "build-env needs ENV_DIR"; exit 1; }
	rm -rf "$(ENV_DIR)"
	$(PYTHON) -m venv "$(ENV_DIR)"
	"$(ENV_DIR)/bin/python" -m pip install $(PIP_FLAGS) --no-deps -r requirements/lock.txt
	"$(ENV_DIR)/bin/python" -m compileall -q -j 0 "$(ENV_DIR)/lib" > /dev/null || true
	@touch "$(ENV_DIR)/.complete"

install: $(STAMP)

demo: $(STAMP)
	snakemake --cores $(JOBS) --config preset=tiny
	@echo "demo outputs: results/tiny/ (data, spectra, logs)"

# The same DAG with the `small` preset (presets/small.yaml): longer-trained autoencoders and
# diffusion runs whose samples resemble the data. Our run: docs/results/small/.
small: $(STAMP)
	snakemake --cores $(JOBS) --config preset=small
	@echo "small outputs: results/small/ (report: results/small/report/index.md)"

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/spectral.py
	$(BIN)/python bench/fid.py
	$(BIN)/python bench/autoencoder.py
	$(BIN)/python bench/diffusion.py
	$(BIN)/python bench/alignment.py --proj-hidden 256

lint: $(STAMP)
	snakemake --lint
	$(BIN)/specmatch dvc deps --check

# The GPU image of every rule (needs apptainer and network at build time); the sidecar .sha256
# is what provenance records as the container's identity. TORCH_CUDA picks the CUDA build of
# torch/torchvision (containers/specmatch.def, %arguments): pypi (PyPI's CUDA 13.0 wheels, the
# ones CI tests; NVIDIA driver R580+), cu128 or cu126 (CUDA 12 drivers). The image records it
# in its labels, with the commit it was built from.
TORCH_CUDA ?= pypi
container: $(STAMP)
	$(BIN)/specmatch container check containers/specmatch.def
	apptainer build --force --build-arg TORCH_CUDA=$(TORCH_CUDA) \
	  --build-arg GIT_COMMIT=$$(git rev-parse HEAD) \
	  --build-arg GIT_DIRTY=$$(test -z "$$(git status --porcelain --untracked-files=no)" && echo 0 || echo 1) \
	  containers/specmatch.sif containers/specmatch.def
	sha256sum containers/specmatch.sif | cut -d' ' -f1 > containers/specmatch.sif.sha256

lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements/base.in -r requirements/dev.in
	@echo "# Exact pins of every package (generated by \`make lock\` from requirements/*.in; do not edit by hand)." > requirements/lock.txt
	$(BIN)/python -m pip freeze --all --exclude-editable | grep -v -i -E '^(specmatch|pip)==' >> requirements/lock.txt
	@echo "requirements/lock.txt updated"

clean-demo:
	rm -rf results/tiny
