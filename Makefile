# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
# Test workers (pytest-xdist), one a core up to 4: most of the suite is single-threaded XLA
# compiles and tiny steps, so 2 workers on CI's 2 cores cut its wall time by ~24%
# (README, "The two commands"). Each test file stays on one worker (`loadfile`): its module fixtures
# (a trained run, an export) are built once. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: setup demo test lint clean

# Idempotent: re-runs pip only when pyproject.toml or setup.py changed since the last setup.
setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the spec we choose, so no dependency pulls another (CUDA) build.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(VENV)/bin/clocmllm demo --workdir $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check clocmllm encoder adapters scripts tests
	$(VENV)/bin/ruff format --check clocmllm encoder adapters scripts tests

clean:
	rm -rf $(VENV) .venv-* runs build *.egg-info
