# tagdiff: `make demo` runs the main job (label guidance ± TAG on digits), `make test` the tests.
# Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tagdiff-installed
OUT    ?= runs/demo

.PHONY: demo test test-all test-other-cpus bench-toy lint lock clean setup

setup: $(STAMP)

# --system-site-packages lets a machine's own torch (e.g. a CUDA build) be used; torch==2.13.0 (CPU wheel here)
# is installed only when no torch is importable. Everything else is the tested set of constraints.txt.
$(STAMP): pyproject.toml benchmarks/pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]" -e ./benchmarks
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tagdiff demo --out $(OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" -q

# The numerical suite as another CPU computes it: generic ATen kernels, MKL/oneDNN capped at AVX2 (the code path
# of an AMD EPYC), one thread; then AVX2 ATen kernels, MKL at SSE4.2, two threads. .ci/run runs both after `test`.
OTHER_CPU_A := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1
OTHER_CPU_B := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 OMP_NUM_THREADS=2
test-other-cpus: $(STAMP)
	$(OTHER_CPU_A) HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow and not io" -q
	$(OTHER_CPU_B) HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow and not io" -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench-toy: $(STAMP)
	$(VENV)/bin/tagdiff bench toy --out runs/bench_toy

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check src tests benchmarks

# After a passing .ci/run: record the installed version set as the one the set-up installs.
lock: $(STAMP)
	$(PY) .ci/lock.py

clean:
	rm -rf runs .pytest_cache
