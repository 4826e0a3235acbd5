# Each target sets up .venv itself: on a fresh machine `make demo` / `make test` is all you type.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test lint models bench studies clean

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e ".[test,serve,eval]"
	touch $@

demo: $(VENV)/.core
	$(VENV)/bin/edlm demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(PY) -m pytest

models: $(VENV)/.core
	$(PY) -m edlm.recipes.demo_model

# dLM vs its AR parent on the demo models, batch 1 and 8, one run (README: Benchmarks).
bench: $(VENV)/.core
	$(VENV)/bin/edlm bench models/dlm --base models/ar --strategies threshold prefix --thresholds 1.0 0.98 0.95 0.9 0.7 0.5 \
		--batch-sizes 1 8 --limit 100 --out bench/results/decode-cpu

# The paper's ablations on the demo data, from the shipped AR parent (see README: study).
studies: $(VENV)/.core
	$(PY) -m edlm.recipes.demo_model --stage data
	$(VENV)/bin/edlm study --base models/ar --data runs/demo-build/data/train.jsonl --out studies \
		--steps 200 --batch-size 8 --lr 3e-4 --shift $(STUDY_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
