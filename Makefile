PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# test workers (pytest-xdist): the suite is CPU-bound and its tests independent; 1 runs it in one process
PYTEST_WORKERS ?= 2
DOCS_STAMP := $(VENV)/.installed-docs
SPHINX_ARGS ?=

export MPLBACKEND := Agg

.PHONY: install demo test lint docs bench bench-full data clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[all,dev]" -c constraints.txt
	touch $@

demo: install
	$(PY) -m ppl_score demo --out out/demo

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

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

# Fashion-MNIST (MIT licence, ~31 MB) from the Debian/Ubuntu package dataset-fashion-mnist:
# installed when apt is available and we are root, else how to get it (also printed, with a
# non-zero exit, when that install fails). Nothing needs it: `make demo` and `make test` run
# without it (the tests that read the real files skip).
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
data:
	@how_to_get_it() { \
		echo "Fashion-MNIST is not installed. On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist"; \
		echo "Elsewhere: download the four idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"; \
		echo "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from https://github.com/zalandoresearch/fashion-mnist"; \
		echo "into a directory DIR and export PPL_SCORE_DATA=DIR (or pass path=DIR to ppl_score.datasets.load_fashion_mnist)."; \
	}; \
	if ls $(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST is installed in $(FASHION_MNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		if apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; then \
			echo "Fashion-MNIST installed in $(FASHION_MNIST_DIR)"; \
		else \
			echo "make data: apt-get could not install dataset-fashion-mnist (see its output above)." >&2; \
			how_to_get_it; \
			exit 1; \
		fi; \
	else \
		how_to_get_it; \
	fi

clean:
	rm -rf out build .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
