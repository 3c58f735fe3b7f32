PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DOCS_STAMP := $(VENV)/.installed-docs
SPHINX_ARGS ?=

export MPLBACKEND := Agg

.PHONY: install demo test lint docs bench bench-full clean

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

$(DOCS_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PY) -m pip install -e ".[docs]" -c constraints.txt
	touch $@

# The HTML docs in out/docs/html, from scratch, warnings as errors, offline (no intersphinx).
# Executes every tutorial in smoke mode (minutes); SPHINX_ARGS="-D plot_gallery=0" skips them.
docs: $(DOCS_STAMP)
	rm -rf out/docs docs/api/generated docs/tutorials
	OMP_NUM_THREADS=1 $(PY) -m sphinx -b html -W --keep-going $(SPHINX_ARGS) docs out/docs/html

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
