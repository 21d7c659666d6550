# anatomask-lab: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create .venv when it is missing. torch is installed first, pinned, so nothing else pulls another build.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH_VERSION)
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: all install demo test lint lab bench test-browser clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

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
# download). The playwright pin must match pyproject.toml's dev extras.
test-browser: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install --quiet "playwright==1.65.2"
	ANATOMASK_BROWSER=1 $(BIN)/python -m pytest tests/browser -m browser -v -rP

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
