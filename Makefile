# The two set-up commands: `make test` and `make check`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
# The torch requirement installed before the package, as pip arguments (not quoted, so an
# index option may follow). This machine's default is the CPU wheel on its disk; elsewhere
# `torch==2.13.0` from PyPI is a CUDA build, so say which build you want, e.g.
#   make test TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install test wheel-check check docs bench gpu-check clean FORCE

# Reinstall when pyproject.toml or the TORCH requirement changes.
$(VENV)/.torch: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@

$(STAMP): pyproject.toml $(VENV)/.torch
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n 2 tests
	$(MAKE) --no-print-directory wheel-check

# The wheel, built and installed into a clean virtual environment away from the checkout,
# where the API, the CLI and the pytest plugin each check one case file.
wheel-check: install
	bash .ci/wheel-check "$(BIN)/python" "$(TORCH)"

check: install
	$(BIN)/backprop-check run cases/

# The documentation site (mkdocs.yml, docs/) into build/site; a warning is an error. The pages'
# examples are run by the test suite (tests/test_docs.py), not here.
docs: install
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# BENCH: arguments for benchmarks/run.py, e.g. `make bench BENCH=--quick` or `BENCH=soundness`.
# JAX is a bench-only extra (a row of section 5), never a dependency of the package.
BENCH ?=
bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench]" || echo "jax not installed: section 5 skips its rows"
	$(BIN)/python benchmarks/run.py $(BENCH)

# On a machine with an NVIDIA GPU and a CUDA build of torch for GPU_PYTHON: the suite and the
# built-in cases on cuda and cpu, float32 and float64, with cross-device agreement.
GPU_PYTHON ?= python3
gpu-check:
	bash .ci/gpu-check "$(GPU_PYTHON)"

clean:
	rm -rf $(VENV) build dist *.egg-info
