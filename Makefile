# anatomask-lab: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create .venv when it is missing. torch is installed first, pinned, so nothing else pulls another build; the
# rest installs with constraints.txt (the exact versions CI tests), and reinstalls when it or pyproject.toml changes.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# TORCH_INDEX: where torch comes from; empty = pip's configured indexes (on Linux, PyPI's torch is the CUDA build:
# TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the CPU build, which CI tests).
TORCH_INDEX ?=
CONSTRAINTS := constraints.txt
EXTRAS ?= dev,lab,sitk,log
# spconv (the `spconv` backend) has CUDA 12 wheels for Linux x86_64 and Windows only (none for macOS, aarch64 or
# Python 3.14). auto: install it where a wheel exists, carry on without it elsewhere (the default `masked` backend
# needs none); yes: fail without it; no: skip it.
SPCONV ?= auto
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH_VERSION)
PIP := $(BIN)/python -m pip install --quiet
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# GPU environment (CUDA torch from the PyTorch wheel index, same versions and test extras as CI): `make gpu-env`.
# TORCH_CUDA names the index (cu128: CUDA 12.8); if it has no build of TORCH_VERSION, take the one pytorch.org lists.
GPU_VENV ?= .venv-gpu
TORCH_CUDA ?= cu128
GPU_STAMP := $(GPU_VENV)/.installed-$(TORCH_VERSION)-$(TORCH_CUDA)

.PHONY: all install gpu-env demo test lint lab bench test-browser clean

all: test

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	@# the spconv extra on its own, so that a platform without its wheels still gets everything else
	@if [ "$(SPCONV)" = no ]; then echo "make: SPCONV=no, spconv not installed (the spconv backend is unavailable)"; \
	elif $(PIP) -c $(CONSTRAINTS) -e ".[spconv]"; then echo "make: spconv installed"; \
	elif [ "$(SPCONV)" = auto ]; then echo "make: spconv did not install (no wheel for this platform or Python?):" \
	"the spconv backend is unavailable, the default masked backend works; SPCONV=yes makes this an error"; \
	else exit 1; fi
	touch $@

install: $(STAMP)

$(GPU_STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --upgrade pip
	$(GPU_VENV)/bin/python -m pip install torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/$(TORCH_CUDA)
	$(GPU_VENV)/bin/python -m pip install -c $(CONSTRAINTS) -e ".[$(EXTRAS),spconv]"
	$(GPU_VENV)/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
	'GPU available:', torch.cuda.is_available())"
	touch $@

gpu-env: $(GPU_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check anatomask_lab tests bench data_scripts

test: $(STAMP) lint
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/anatomask-lab demo --out $(DEMO_OUT)

lab: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 notebooks

bench: $(STAMP)
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

# Opt-in: notebook 01 in a real JupyterLab, driven in Debian's headless chromium through Playwright (no browser
# download). playwright comes with the dev extra, at the version of constraints.txt.
test-browser: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(BIN)/python -c "import playwright" 2>/dev/null || $(PIP) -c $(CONSTRAINTS) playwright
	ANATOMASK_BROWSER=1 $(BIN)/python -m pytest tests/browser -m browser -v -rP

clean:
	rm -rf $(VENV) $(GPU_VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
