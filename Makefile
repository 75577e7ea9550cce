# fdcore: `make run` starts the router with two local SmolLM2 engines; `make test` runs the tests.
# Both set everything up first (virtual environment, dependencies, the model file).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= models

.PHONY: setup model run test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

model: setup
	$(VENV)/bin/fdcore models pull --dest $(MODELS)

run: setup model
	$(VENV)/bin/fdcore serve --config examples/main/config.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy fdcore plugins

test: setup model lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache .mypy_cache .ruff_cache
