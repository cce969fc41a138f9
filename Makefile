# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv/ on first use (an editable install of setup.cfg with
# the test, face, quantize and demo extras) and reuses it afterwards; editing setup.cfg reinstalls.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast clean-demo

$(STAMP): pyproject.toml setup.cfg setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[test,face,quantize,demo]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch/demo.py --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf $(OUT)
