# Two commands on a fresh machine:  `make search` (set up + run the main job)  and  `make test`.
# Each creates .venv with `pip install -e ".[dev]"` the first time (or when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup search train test test-fast lint bench dashboard tensorboard clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

search: $(STAMP)  ## the hyperparameter search; extra options via ARGS="--samples 20 --data-dir D"
	$(PY) search/run.py --samples 50 $(ARGS)

train: $(STAMP)  ## one training run; extra options via ARGS="--epochs 5 --set model=resnet"
	$(PY) training/train.py --config configs/train.yaml $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint  ## ruff + the whole test suite (real-data tests run when EMNIST_DATA_DIR is set)
	$(PY) -m pytest -q --durations=15 $(ARGS)

test-fast: $(STAMP)  ## the tests not marked slow (under 5 min on 2 cores), to run while working; CI runs `make test`
	$(PY) -m pytest -q -m "not slow" --durations=15 $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.train $(ARGS)

dashboard: $(STAMP)  ## Streamlit dashboard on http://127.0.0.1:8501 over results/ (ARGS="--results DIR --port N")
	$(PY) -m dashboard $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir results --host 127.0.0.1

clean-venv:
	rm -rf $(VENV)
