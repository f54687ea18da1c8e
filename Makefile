# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create .venv (reusing a torch
# that is already installed, e.g. system-wide), install the package with the extras they need, then run.
PYTHON ?= python3
VENV ?= .venv
# torch is only installed when the venv cannot import one; 2.13.0 has a local CPU wheel on our build machines.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-fast clean-venv

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 4))" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed-%: setup.cfg pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/diffusers-retina demo --output demo_panel.png

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
