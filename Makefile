# tagdiff: `make demo` runs the main job (label guidance ± TAG on digits), `make test` the tests.
# Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tagdiff-installed
OUT    ?= runs/demo

.PHONY: demo test test-all bench-toy lint clean setup

setup: $(STAMP)

# --system-site-packages lets a machine's own torch (e.g. a CUDA build) be used; torch==2.13.0 (CPU wheel here)
# is installed only when no torch is importable.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tagdiff demo --out $(OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench-toy: $(STAMP)
	$(VENV)/bin/tagdiff bench toy --out runs/bench_toy

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
