# The two commands: `make demo` and `make test`. They create the virtual environments they need and install the package.
# Two environments, because FedML and Flower cannot share one (protobuf 3.20 vs >= 5.28; docs/install.md):
#   .venv         core + [fedml,pretrain,test]  FedML stack (numpy<2, protobuf 3.20, MLflow 2.22); make demo uses it
#   .venv-flower  core + [flower,ray,test]      current stack (numpy 2, protobuf >= 5.28, MLflow 3)
# make test runs the core tests in both, the FedML tests (and the one of mini-CLIP pretraining, which needs the MNIST
# package of [pretrain], numpy<2) in .venv, the Flower and Ray tests in .venv-flower. pytest's
# status passes through: any failure, or no test selected (status 5), fails make test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FLOWER_VENV := .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed
FEDML_EXTRAS := fedml,pretrain,test
FLOWER_EXTRAS := flower,ray,test

.PHONY: demo test install clean-cache perf test-fedml-stack test-current-stack

# $(1): the venv folder, $(2): the extras
define build_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q -e '.[$(2)]'
	$(1)/bin/pip check
	touch $(1)/.installed
endef

$(STAMP): setup.py third_party/fastapi_cli/pyproject.toml
	$(call build_venv,$(VENV),$(FEDML_EXTRAS))

$(FLOWER_STAMP): setup.py | $(STAMP)  # after .venv: two editable installs at once would share one egg-info folder
	$(call build_venv,$(FLOWER_VENV),$(FLOWER_EXTRAS))

install: $(STAMP) $(FLOWER_STAMP)

demo: $(STAMP)
	$(BIN)/pfedmoap-bench run --config configs/quickstart.yaml

# The two suites run side by side (each mostly waits on its own subprocesses); --output-sync prints each suite's
# output in one block when it ends. Both must pass. `make test-fedml-stack` / `make test-current-stack` run one.
test: $(STAMP) $(FLOWER_STAMP)
	@echo "make test: both suites in parallel; each prints its output when it ends"
	$(MAKE) --no-print-directory -j2 --output-sync=target test-fedml-stack test-current-stack

test-fedml-stack: $(STAMP)
	$(BIN)/python -m pytest -m "not flower and not ray" -o cache_dir=.pytest_cache/fedml-stack

test-current-stack: $(FLOWER_STAMP)
	$(FLOWER_VENV)/bin/python -m pytest -m "not fedml and not pretrain" -o cache_dir=.pytest_cache/current-stack

perf: $(STAMP)
	$(BIN)/pfedmoap-bench perf --scale tiny

clean-cache:
	rm -rf .cache
