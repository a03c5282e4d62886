# The two commands a fresh machine needs: `make demo` and `make test`. Each creates/refreshes .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/segfactory demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25

# unit tiers only: no Ray, no subprocess, nothing slow (conftest fails a test that starts one unmarked)
test-fast: $(STAMP)
	SEGFACTORY_FAST_TESTS=1 $(VENV)/bin/python -m pytest -q -m "not ray and not subprocess and not slow and not gpu" --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo-output .pytest_cache
