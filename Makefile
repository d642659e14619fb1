# Two commands: `make demo` (set up + run the embedded demo) and `make test` (set up + run the tests).
# While developing: `make test-fast` (no child processes, nothing slow; under 2 minutes) and `make lint`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= runs/demo

.PHONY: setup demo test test-fast lint test-floors gpu-check gpu-wheels clean

setup: $(VENV)/.installed

# torch is pinned in the same resolve so pip never swaps in a multi-GB CUDA build.
$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $@

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo.sh $(DEMO)

test: setup
	$(PY) -m pytest -q --durations=25 tests

# The markers are declared in pyproject.toml; CONTRIBUTING.md says which tests guard what.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not multiprocess and not needs_root and not gpu" tests

lint: setup
	$(PY) -m ruff check .

# The dependency floors of setup.py, proven: a second venv with exactly those versions (.ci/floors.py;
# torch 2.13.0, the one CPU build at hand) runs the unit tests and a 2-rank ZeRO-3 run. It builds
# DeepSpeed's CPU ops into a cache of its own: ops built against one venv are rebuilt for the other.
FLOORS ?= .venv-floors
test-floors: $(FLOORS)/.installed
	TORCH_EXTENSIONS_DIR="$(HOME)/.cache/allora_ds/floors/torch_extensions" \
	HF_DATASETS_CACHE="$(HOME)/.cache/allora_ds/floors/datasets" \
	$(FLOORS)/bin/python -m pytest -q tests/unit tests/integration/test_train_e2e.py::test_loss_decreases \
		tests/integration/test_train_e2e.py::test_metrics_are_well_formed

$(FLOORS)/.installed: setup.py .ci/floors.py
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/python -m pip install --quiet --upgrade pip
	$(PYTHON) .ci/floors.py > $(FLOORS)/floors.txt
	$(FLOORS)/bin/python -m pip install --quiet "torch==2.13.0" -c $(FLOORS)/floors.txt -e ".[dev]"
	$(FLOORS)/bin/python .ci/floors.py --check
	touch $@

# On one NVIDIA GPU: install, GPU-marked tests, the Llama-3-8B benchmark, one JSON
# (bench/results/gpu_check.json). Uses the active python3 and its CUDA torch; offline from the
# wheels of `make gpu-wheels` when .gpu-wheels/ holds any. See launch/gpu_check.sh.
gpu-check:
	bash launch/gpu_check.sh

gpu-wheels: setup
	PYTHON=$(PY) bash launch/gpu_check.sh wheels .gpu-wheels

clean:
	rm -rf $(VENV) $(FLOORS) runs *.egg-info
