# The two commands: `make demo` and `make test`. Both create .venv if missing and install the package first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-cache perf

$(STAMP): setup.py third_party/fastapi_cli/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pfedmoap-bench run --config configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest tests

perf: $(STAMP)
	$(BIN)/pfedmoap-bench perf --scale tiny

clean-cache:
	rm -rf .cache
