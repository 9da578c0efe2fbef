# Two commands on a fresh machine:
#   make demo   install, then run the end-to-end tiny pipeline on 2 CPU ranks
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export OMP_NUM_THREADS ?= 1

.PHONY: install test demo ablation bench clean

install: $(STAMP)

# torch goes in first (the 2.13.0 CPU build where none is present) so that
# nothing later pulls a multi-GB CUDA build.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m distill.demo --out runs/demo

ablation: $(STAMP)
	$(PY) -m distill.demo --out runs/ablation --ablation

bench: $(STAMP)
	$(PY) launch/bench.py

clean:
	rm -rf runs build *.egg-info
