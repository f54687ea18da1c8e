# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create .venv (reusing a torch
# that is already installed, e.g. system-wide), install the package with the extras they need, then run.
PYTHON ?= python3
VENV ?= .venv
# torch is only installed when the venv cannot import one; 2.13.0 has a local CPU wheel on our build machines.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-fast browser screenshot clean-venv

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

# A real headless browser for tests/test_app.py: Debian's Chromium (Playwright's own browser download does not work
# on our machines; the test launches the Debian binary through Playwright's executable_path).
browser: $(VENV)/.installed-test
	command -v chromium-headless-shell >/dev/null || (apt-get update && apt-get install -y chromium-headless-shell)
	$(BIN)/pip install -q playwright

# The Space in the browser, its screenshot kept as docs/space_screenshot.png (shown in the README).
screenshot: browser
	SPACE_SCREENSHOT=docs/space_screenshot.png $(BIN)/python -m pytest -q tests/test_app.py -k browser

clean-venv:
	rm -rf $(VENV)
