# The two commands: `make demo` (the whole pipeline on the tiny world) and `make test`.
# Both do all set-up on a fresh machine: virtualenv, install, LLM conversion cache.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMNIDIFF_HOME ?= $(CURDIR)/.omnidiff
PYTEST_ARGS ?=

.PHONY: install llm demo test test-fast lint stack-up stack-down clean

# requirements/install.py: the pins installed with uv (pip's package sources handed to it), falling back to
# pip with a warning (OMNIDIFF_INSTALLER=pip forces pip), then the `dataclasses` backport removed (NOTES.md).
$(STAMP): pyproject.toml requirements/constraints.txt requirements/install.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python requirements/install.py
	touch $(STAMP)

install: $(STAMP)

# Convert Gemma 3 270M (GGUF from PyPI) once into a cached safetensors folder.
llm: install
	$(BIN)/omnidiff llm convert

# Stack up (Prefect, MLflow, Ray, deployment-serving process), trigger the pipeline deployment, report.
# `make demo SEED=1` replicates it with another seed for every training stage and the evaluation;
# DEMO_ARGS passes dotted overrides (e.g. DEMO_ARGS="stage2.max_steps=400").
SEED ?=
DEMO_ARGS ?=
demo: install llm
	$(BIN)/omnidiff demo --config configs/pipeline.yaml $(if $(SEED),--seed $(SEED)) $(DEMO_ARGS)

test: install llm
	$(BIN)/python -m pytest --durations=30 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not e2e and not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

stack-up: install
	$(BIN)/omnidiff stack up

stack-down:
	$(BIN)/omnidiff stack down

clean:
	rm -rf $(OMNIDIFF_HOME)
