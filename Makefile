# Two commands for a new user:  `make demo`  and  `make test`.
# Each creates .venv (CPU PyTorch 2.13.0 unless a torch is already there) and installs sdmoe.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SDMOE   = $(BIN)/sdmoe

.PHONY: install demo demo-full test test-integrations test-slow bench gpu-check reproduce upcycle finetune methods clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# The first look, 5 min 22 s on 2 cores once .venv is set up (16 runs of about 16 s at d = 64 and 4 timing
# processes): baseline vs SD-MoE and the control, 3 paired seeds, on the bundled mix and then on drama alone, one
# report with a verdict per claim (runs/compare-demo/report.html). A re-run skips finished runs and resumes the rest.
demo: install
	$(SDMOE) compare --preset demo --out runs/compare-demo

# The whole demo grid: both styles, the rate check (0.5x) and 4x, then every domain alone (41 runs, about
# 15-20 minutes on 2 cores). Resumable.
demo-full: install
	$(SDMOE) compare --preset demo-full --out runs/compare-demo-full

# The lab-model evidence of docs/results.md (issue 18): baseline, default SD-MoE, the paper's own split and
# the control, 3 paired seeds at the baseline's tuned rate 6e-3, the 0.5x-4x rate grid around it and the paper's
# ablations; 27 runs, 2-3 hours on 2 cores.
# Resumable: run it again to continue.
reproduce: install
	$(SDMOE) compare --preset lab --out runs/compare-lab

# Starting from a trained model (docs/results.md, "Starting from a trained model"): a dense parent upcycled by
# copy and Drop-Upcycling, continued with and without SD-MoE (17 runs, about 6 minutes on 2 cores), and an MoE
# of two domains adapted to the third (8 runs, about 3 minutes). Resumable.
upcycle: install
	$(SDMOE) upcycle-compare --preset upcycle --out runs/compare-upcycle

finetune: install
	$(SDMOE) finetune-compare --preset finetune --out runs/compare-finetune

# Which specialisation remedy (docs/results.md, "Which method when"): SD-MoE head to head with Guo et al.'s
# losses and global-batch balancing, and combined with each, from scratch and from upcycled starts, each arm at
# its own best rate; 108 runs, about 65 minutes on 2 cores. Resumable.
methods: install
	$(SDMOE) methods-compare --out runs/methods

test: install
	$(BIN)/python -m pytest

# The training stacks' integration tests (docs/integrations.md): installs the olmo-core and torchtitan
# extras into .venv (about 1 GB with Triton, which torchtitan imports), then runs their tests, which
# `make test` skips without them. CI runs it after `make test`.
test-integrations: install
	$(BIN)/python -m pip install -q -e ".[test,olmo-core,torchtitan,mergekit]"
	$(BIN)/python -m pytest tests/integrations

test-slow: install
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/python benchmarks/run_all.py

# The prepared GPU check (docs/performance.md section 5): under 8 minutes on one GPU; --tiny runs it on a CPU.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out runs/gpu-check

clean-venv:
	rm -rf $(VENV)
