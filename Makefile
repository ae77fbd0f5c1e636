# ringbook task runner. `make bench` runs the benchmark, `make test` the whole
# suite; each creates or refreshes its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# No NVIDIA GPU here: pin PyTorch's CPU wheel so pip never pulls the CUDA build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_PIN := $(if $(HAS_GPU),,-c constraints/cpu.txt)
BENCH_ARGS ?=
# tests/test_browser.py drives this Chromium (Debian's `chromium` package) through Playwright.
CHROMIUM ?= /usr/bin/chromium
export RINGBOOK_CHROMIUM := $(CHROMIUM)

.PHONY: bench bench-commit test lint unit notebooks sync-notebooks teacher screenshots browser-deps clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.base: $(VENV)/.created pyproject.toml constraints/cpu.txt
	$(PY) -m pip install -q $(TORCH_PIN) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q $(TORCH_PIN) -e ".[test]"
	touch $@

## The main job: the benchmark, sized to the device it finds.
bench: $(VENV)/.base
	$(PY) -m ringbook bench $(BENCH_ARGS)

## The same, written over the committed results in figures/ (make bench writes into results/, ignored by git).
bench-commit: $(VENV)/.base
	$(PY) -m ringbook bench --out figures $(BENCH_ARGS)

## Chromium for the browser test: installed with apt when missing (as root), else a clear error.
browser-deps:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$(CHROMIUM)" = /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium for tests/test_browser.py: apt-get install -y chromium"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
		echo "make test needs Chromium at $(CHROMIUM) for tests/test_browser.py (notebooks in a real browser)." >&2; \
		echo "Install Debian's chromium package: sudo apt-get install -y chromium" >&2; \
		echo "(or run make as root and it installs it; or make test CHROMIUM=/path/to/chromium)." >&2; \
		exit 1; \
	fi

## Lint (ruff, configured in pyproject.toml), unit tests (the browser test included), then every notebook under nbval.
# The notebooks save their figures into a temporary folder here, so testing leaves the clone clean;
# `make sync-notebooks` refreshes the committed figures, `make screenshots` the browser pictures.
test: $(VENV)/.test browser-deps lint
	$(PY) -m pytest -q -n 2 tests --deselect tests/test_browser.py
	$(PY) -m pytest -q tests/test_browser.py
	RINGBOOK_FIGURES_OUT=$$(mktemp -d) $(PY) -m pytest -q -n 2 --dist loadfile --nbval --nbval-current-env notebooks

lint: $(VENV)/.test
	$(PY) -m ruff check .

unit: $(VENV)/.test browser-deps
	$(PY) -m pytest -q -n 2 tests --deselect tests/test_browser.py
	$(PY) -m pytest -q tests/test_browser.py

notebooks: $(VENV)/.test
	RINGBOOK_FIGURES_OUT=$$(mktemp -d) $(PY) -m pytest -q -n 2 --dist loadfile --nbval --nbval-current-env notebooks

## Refresh the committed screenshots of the notebooks in a real browser (figures/browser/).
screenshots: $(VENV)/.test browser-deps
	RINGBOOK_SCREENSHOTS=$(CURDIR)/figures/browser $(PY) -m pytest -q tests/test_browser.py

## Re-execute the notebooks from their jupytext sources and store their outputs.
sync-notebooks: $(VENV)/.test
	$(PY) tools/build_notebooks.py

## Teachers: executed notebooks with the exercises solved, in build/teacher/ (git ignores it).
teacher: $(VENV)/.test
	$(PY) tools/teacher_build.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
