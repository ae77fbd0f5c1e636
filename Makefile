# ringbook task runner. `make bench` runs the benchmark, `make test` the whole
# suite; each creates or refreshes its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# No NVIDIA GPU here: pin PyTorch's CPU wheel so pip never pulls the CUDA build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_PIN := $(if $(HAS_GPU),,-c constraints/cpu.txt)
BENCH_ARGS ?=

.PHONY: bench test unit notebooks sync-notebooks clean

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

## Unit tests, then every notebook under nbval.
test: $(VENV)/.test
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval --nbval-current-env notebooks

unit: $(VENV)/.test
	$(PY) -m pytest -q tests

notebooks: $(VENV)/.test
	$(PY) -m pytest -q --nbval --nbval-current-env notebooks

## Re-execute the notebooks from their jupytext sources and store their outputs.
sync-notebooks: $(VENV)/.test
	$(PY) tools/build_notebooks.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
