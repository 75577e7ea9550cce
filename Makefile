# fdcore: `make run` starts the router with two local SmolLM2 engines (`make run-pd`: one prefill
# and one decode engine); `make test` runs the tests.
# Both set everything up first (virtual environment, dependencies, the model file).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= models

.PHONY: setup model run run-pd test lint clean pyverbs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@$(MAKE) --no-print-directory pyverbs
	touch $@

model: setup
	$(VENV)/bin/fdcore models pull --dest $(MODELS)

run: setup model
	$(VENV)/bin/fdcore serve --config examples/main/config.yaml

# The same in prefill/decode mode: one prefill and one decode engine behind a splitwise router.
run-pd: setup model
	$(VENV)/bin/fdcore serve --config examples/pd/config.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy fdcore plugins

test: setup model lint
	$(VENV)/bin/pytest -q

# The `rdma` KV transport needs pyverbs, which pip cannot install: Debian's python3-pyverbs
# provides it for the system Python 3.11. This exposes that one package (not the rest of
# dist-packages) to the virtualenv through a .pth file.
PYVERBS_SRC ?= /usr/lib/python3/dist-packages/pyverbs

pyverbs:
	@if [ ! -x $(PY) ]; then echo "no virtualenv at $(VENV): run 'make setup' first"; exit 1; fi
	@if [ -d $(PYVERBS_SRC) ]; then \
		mkdir -p $(VENV)/pyverbs-path && \
		ln -sfn $(PYVERBS_SRC) $(VENV)/pyverbs-path/pyverbs && \
		site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
		echo "$(abspath $(VENV))/pyverbs-path" > "$$site/fdcore-pyverbs.pth" && \
		$(PY) -c 'import pyverbs.device; print("pyverbs importable from", pyverbs.__path__[0])'; \
	else \
		echo "pyverbs is not installed: run 'apt-get install python3-pyverbs', then 'make pyverbs'"; \
	fi

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache .mypy_cache .ruff_cache
