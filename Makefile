# The two commands a newcomer needs: `make demo` and `make test`. Each one creates the
# virtual environment in .venv on first use and installs the project into it (which
# compiles the selection core); editing the Cython sources or the packaging rebuilds it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint bench bench-compare clean

$(INSTALLED): pyproject.toml setup.py $(wildcard core_ext/*.pyx core_ext/*.pxd dispatcher/*/*.pyx dispatcher/*/*.pxd)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "imdispatch needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

demo: $(INSTALLED)
	$(VENV)/bin/imdispatch selfcheck
	$(VENV)/bin/imdispatch demo $(DEMO_ARGS)

# pytest exits 5 when it collected no test: for us that is a broken suite, so a failure.
test: $(INSTALLED) lint
	@$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; \
	exit $$status

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

# The whole suite and its report (bench/results/<time>/report.md, .json, plots).
bench: $(INSTALLED)
	$(PY) -m bench.report -- $(PYTEST_ARGS)

bench-compare: $(INSTALLED)
	$(PY) -m pytest bench --benchmark-compare --benchmark-compare-fail=median:25% --benchmark-columns=median $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info core_ext/*.c core_ext/*.so .pytest_cache .benchmarks
