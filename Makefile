# Two commands: `make demo` (set up + run the embedded demo) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= runs/demo

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

# torch is pinned in the same resolve so pip never swaps in a multi-GB CUDA build.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $@

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo.sh $(DEMO)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) runs *.egg-info
