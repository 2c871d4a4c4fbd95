# The two commands: `make demo` (the whole DAG on the embedded default) and `make test`.
# Both create .venv from nothing when it is missing and install the exact pins first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
# The environment is built once per lock file: .venv links to $(ENV_CACHE)/py311-<hash of the
# lock>, so a fresh clone on a machine that already installed the same pins reuses them (a
# cache keyed by the lock file, as CI caches are). Installing the ~195 wheels takes minutes
# on our 2-core machines. `make ENV_CACHE=` builds .venv in place instead.
ENV_CACHE ?= $(HOME)/.cache/specmatch/envs
LOCK_ID := $(shell cat requirements/lock.txt | sha256sum | cut -c1-16)
# Per clone: this checkout's editable install into the (possibly shared) environment is done.
STAMP  := .venv.stamp
export PATH := $(BIN):$(PATH)
# Single-threaded BLAS/OpenMP inside each job: the DAG already runs jobs in parallel.
JOBS ?= 2
# An extra local wheel folder for pip (find-links), used when it exists.
WHEELS ?= /opt/wheels
PIP_FLAGS := --quiet --disable-pip-version-check --no-compile $(if $(wildcard $(WHEELS)),--find-links $(WHEELS))
PIP_INSTALL := $(BIN)/python -m pip install $(PIP_FLAGS)

.PHONY: demo small test test-fast bench lint install lock clean-demo help build-env container

help:
	@echo "make demo       run the whole tiny DAG on the embedded default (CPU, minutes)"
	@echo "make small      the small preset: diffusion that makes images (about an hour on 2 CPU cores)"
	@echo "make test       run the test suite (installs .venv first)"
	@echo "make test-fast  the unit tests only (no end-to-end DAG runs)"
	@echo "make bench      run the benchmarks in bench/"
	@echo "make container  check and build the Apptainer image containers/specmatch.sif (needs apptainer)"
	@echo "make lock       re-resolve requirements/*.in into requirements/lock.txt"

$(STAMP): requirements/lock.txt pyproject.toml
	@if [ -n "$(ENV_CACHE)" ]; then \
	  env="$(ENV_CACHE)/py311-$(LOCK_ID)"; \
	  test -f "$$env/.complete" || $(MAKE) --no-print-directory build-env ENV_DIR="$$env" || exit 1; \
	  rm -rf $(VENV) && ln -s "$$env" $(VENV); \
	else \
	  test -f $(VENV)/.complete || $(MAKE) --no-print-directory build-env ENV_DIR="$(CURDIR)/$(VENV)" || exit 1; \
	fi
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	@touch $@

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
