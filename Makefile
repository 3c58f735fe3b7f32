PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export MPLBACKEND := Agg

.PHONY: install demo test lint bench bench-full clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[all,dev]" -c constraints.txt
	touch $@

demo: install
	$(PY) -m ppl_score demo --out out/demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: install
	@mkdir -p out/bench
	@set -e; for f in benchmarks/[!_]*.py; do \
		[ -e "$$f" ] || continue; \
		name=$$(basename "$$f" .py); \
		echo "== $$f (quick)"; \
		$(PY) "$$f" --quick --json "out/bench/$$name.json"; \
	done

bench-full: install
	@mkdir -p out/bench
	@set -e; for f in benchmarks/[!_]*.py; do \
		[ -e "$$f" ] || continue; \
		name=$$(basename "$$f" .py); \
		echo "== $$f"; \
		$(PY) "$$f" --json "out/bench/$$name.json"; \
	done

clean:
	rm -rf out build .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
