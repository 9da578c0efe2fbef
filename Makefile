# Two commands on a fresh machine:
#   make demo   install, then run the end-to-end tiny pipeline on 2 CPU ranks
#   make test   install, then run the test suite
#   make test-lowest  the capture, objective and model tests on the lowest declared transformers
#   make test-quick   the suite without the multi-process / end-to-end tests (a few minutes)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export OMP_NUM_THREADS ?= 1

# lowest transformers that setup.py allows (keep the two in step)
LOWEST_TRANSFORMERS ?= 5.17.0
LOW_VENV ?= .venv-lowest
LOW_PY   := $(LOW_VENV)/bin/python
LOW_STAMP := $(LOW_VENV)/.installed-$(LOWEST_TRANSFORMERS)

.PHONY: install test test-quick test-lowest demo ablation bench clean

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

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

$(LOW_STAMP): setup.py
	test -x $(LOW_PY) || $(PYTHON) -m venv $(LOW_VENV)
	$(LOW_PY) -m pip install -q --upgrade pip
	$(LOW_PY) -c "import torch" 2>/dev/null || $(LOW_PY) -m pip install -q torch==2.13.0
	$(LOW_PY) -m pip install -q -e '.[test]' 'transformers==$(LOWEST_TRANSFORMERS)'
	touch $@

test-lowest: $(LOW_STAMP)
	$(LOW_PY) -c "import transformers as t; assert t.__version__ == '$(LOWEST_TRANSFORMERS)', t.__version__"
	$(LOW_PY) -m pytest -q tests/test_capture.py tests/test_attention_op.py tests/test_objective.py \
		tests/test_models.py tests/test_losses.py tests/test_fused_loss.py tests/test_flash_detect.py

demo: $(STAMP)
	$(PY) -m distill.demo --out runs/demo --teacher-dir runs/tiny_teacher

ablation: $(STAMP)
	$(PY) -m distill.demo --out runs/ablation --ablation --teacher-dir runs/tiny_teacher

bench: $(STAMP)
	$(PY) launch/bench.py

clean:
	rm -rf runs build *.egg-info
