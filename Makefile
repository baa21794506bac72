# Every target sets up its environment first when it is missing, so a fresh clone needs only `make test` or
# `make demo`. Environments:
#   .venv         `make test`, `make demo`: the exact versions of requirements/lock.txt (hashes checked)
#   .venv-latest  `make test-latest`: the newest releases pyproject.toml allows, resolved afresh
#   .venv-lowest  `make test-lowest`: the oldest releases pyproject.toml allows (requirements/lowest.txt)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LOWEST := requirements/lowest.txt
EXTRAS := dev,plot,hf,data,eval,serve
# torch is the one package outside lock.txt: which build fits (CPU or CUDA) depends on the machine. Its version
# is pinned here; pip takes the build the machine offers (on this project's machines, a local CPU build).
TORCH ?= torch==2.13.0
# test-latest takes the newest torch pip will install here (a machine-wide pip constraint may cap it).
TORCH_LATEST ?= torch
# uv resolves the lock files (pip installs them); pinned so that `make lock` is reproducible too.
UV_VERSION ?= 0.13.9
TOOLS := .venv-tools
UV := $(TOOLS)/bin/uv
PIP_QUIET := -q --disable-pip-version-check
# Every environment below holds all extras: tests/test_environment.py then requires each to import.
export HIPPOS_ALL_EXTRAS := 1

.PHONY: setup test test-fast test-latest test-lowest lock demo lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) "$(TORCH)"
	$(BIN)/python -m pip install $(PIP_QUIET) --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/hippos demo

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: $(STAMP)
	$(BIN)/hippos bench layer

# On a machine with a CUDA GPU: the GPU tests and a short set of benchmarks (under 10 minutes), one JSON record.
gpu-check: $(STAMP)
	$(BIN)/python -m hippos.benchmarks.gpu_check --json gpu-check.json

# The newest releases pyproject.toml allows, in an environment of their own (never the lock's).
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	.venv-latest/bin/python -m pip install $(PIP_QUIET) --upgrade "$(TORCH_LATEST)" -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# The oldest releases pyproject.toml allows (every direct dependency at its lower bound, torch included).
test-lowest:
	rm -rf .venv-lowest
	$(PY) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install $(PIP_QUIET) --require-hashes --no-deps -r $(LOWEST)
	.venv-lowest/bin/python -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	.venv-lowest/bin/python -m pip check
	.venv-lowest/bin/python -m pytest -q -p no:cacheprovider

$(UV):
	$(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install $(PIP_QUIET) "uv==$(UV_VERSION)"

# Refresh both lock files from pyproject.toml. lock.txt is resolved against the torch build pip installs here
# (downloaded into build/torch so that uv sees the same one); lowest.txt against PyPI's oldest allowed torch.
lock: $(UV)
	rm -rf build/torch
	$(PY) -m pip download $(PIP_QUIET) --no-deps --dest build/torch "$(TORCH)"
	ls build/torch | sed -E 's/^torch-([^-]+)-.*/torch==\1/' > build/torch/constraint.txt
	$(UV) pip compile -q pyproject.toml requirements/tools.in --all-extras --universal --generate-hashes \
		--find-links build/torch --constraint build/torch/constraint.txt --no-emit-package torch \
		--custom-compile-command "make lock" --output-file $(LOCK)
	$(UV) pip compile -q pyproject.toml requirements/tools.in --all-extras --resolution lowest-direct \
		--python-version 3.11 --generate-hashes --custom-compile-command "make lock" --output-file $(LOWEST)

clean:
	rm -rf $(VENV) .venv-latest .venv-lowest $(TOOLS) build src/*.egg-info .pytest_cache .ruff_cache
