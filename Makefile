# The two set-up commands: `make test` and `make check`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel; override on a CUDA machine, e.g. `make test TORCH=torch==2.13.0`.
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: install test check bench clean

$(BIN)/backprop-check: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/backprop-check

test: install
	$(BIN)/python -m pytest -q -n 2 tests

check: install
	$(BIN)/backprop-check run cases/

bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
