# hal0 — `make demo` on a fresh clone sets everything up and runs it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo run test test-fast test-fresh-boot fuzz lint bench clean conformance

# uv resolves and installs the same packages as pip from the same index, in a third of the
# time (a fresh CI machine spends it on every run). It writes no bytecode unless asked, and
# this machine's environment sets PYTHONDONTWRITEBYTECODE: every Python process compiled
# Django, Twisted and Channels from source on each start (~1 s of CPU; the test suite starts
# about 150 of them). --compile-bytecode does it once, at install.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(PY) -m uv pip install --quiet --compile-bytecode --python $(PY) -e ".[test]"
	touch $@

## demo: venv + install + migrate + admin login + simulator if no lemond + serve on :8000
demo: $(VENV)/.installed
	$(PY) manage.py demo

## run: serve against the real lemond at HAL0_LEMONADE_URL (no simulator)
run: $(VENV)/.installed
	$(PY) manage.py migrate --noinput
	$(PY) manage.py ensure_admin
	$(PY) manage.py serve

# The suites mostly wait on subprocesses (serve, simulators, Chromium): more workers than
# cores. A file's tests stay on one worker, so a module's shared server starts once; the
# longest files go first (tests/conftest.py LONGEST_FIRST).
PYTEST_WORKERS ?= 4
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
# hal0's own modules and the test modules (pytest's rewritten ones) are cached as bytecode
# during a test run even where the environment says not to: the first of the run's many
# processes compiles them, the others load them (__pycache__ is git-ignored).
TEST_ENV := PYTHONDONTWRITEBYTECODE=

## test: lint (ruff; mypy on the actions, views and gateway) + the whole test suite (in parallel; PYTEST_WORKERS=0 runs it in one process)
test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_PARALLEL)

## test-fast: the in-process tests only (no hal0 processes, no browser): pytest -m "not e2e"
test-fast: $(VENV)/.installed
	$(TEST_ENV) $(PY) -m pytest -q -m "not e2e" $(PYTEST_PARALLEL)

## test-fresh-boot: the whole suite with the monotonic clock near zero, as on an appliance
## seconds after power-on (needs root for the time namespace; PYTEST_ARGS picks tests)
test-fresh-boot: $(VENV)/.installed
	$(TEST_ENV) tests/fresh-boot $(PY) -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS)

## fuzz: the property-based tests with fresh random inputs, 1500 examples each (~3 min)
fuzz: $(VENV)/.installed
	HAL0_PROPERTY_EXPLORE=1 HAL0_PROPERTY_EXAMPLES=1500 $(PY) -m pytest -q tests/test_properties.py

## conformance: lemond's own test suites against the simulator, per supported lemond tag
##   make conformance LEMONADE_SRC=<lemonade-sdk/lemonade checkout or git dir>
##   [CONFORMANCE_ARGS="--tag v11.7.0 --suite server_llm --record docs/conformance.md"]
conformance: $(VENV)/.conformance
	@test -n "$(LEMONADE_SRC)" || { echo "set LEMONADE_SRC=<lemonade checkout or git dir>"; exit 2; }
	$(PY) -m providers.lemonade.conformance --src "$(LEMONADE_SRC)" $(CONFORMANCE_ARGS)

$(VENV)/.conformance: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[test,conformance]"
	touch $@

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(VENV)/.installed
	$(PY) bench/dashboard.py
	$(PY) bench/gateway.py
	$(PY) bench/faults.py
	$(PY) bench/bodies.py

clean:
	rm -rf $(VENV) var/test-hal0.sqlite3 test-artifacts
