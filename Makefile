# Two commands for a new user:  `make demo`  and  `make test`.
# Each creates .venv (CPU PyTorch 2.13.0 unless a torch is already there) and installs sdmoe.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SDMOE   = $(BIN)/sdmoe

.PHONY: install demo test test-slow bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# The main job on the bundled corpora (a re-run resumes and rebuilds the report).
demo: install
	$(SDMOE) train --preset demo --out runs/demo $$([ -f runs/demo/run.json ] && echo --resume)
	$(SDMOE) generate runs/demo/model --prompt "The king said"

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/python benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
