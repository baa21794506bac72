# Every target sets up .venv first when it is missing, so a fresh clone needs only `make test` or `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here (not in pyproject) so that pip takes the CPU build the machine provides;
# pyproject accepts any torch 2.x that satisfies the code.
TORCH ?= torch==2.13.0

.PHONY: setup test test-fast demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,plot,hf,data,eval]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

demo: $(STAMP)
	$(BIN)/hippos demo

bench: $(STAMP)
	$(BIN)/hippos bench layer

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
