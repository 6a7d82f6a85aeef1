# Two commands matter on a fresh clone: `make serve` and `make test`; both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export QASERVE_DATA_DIR ?= $(CURDIR)/.qaserve/data
export QASERVE_CACHE_DIR ?= $(CURDIR)/.qaserve/cache

.PHONY: setup serve demo test test-fast bench-smoke loadtest lint typecheck check format clean

setup:
	@bash scripts/setup.sh

serve: setup  ## the Ray Serve graph + HTTP API on 127.0.0.1:8000 over the shipped sample corpus
	$(VENV)/bin/qaserve serve

demo: setup  ## the same engine in-process (no Ray): answers the sample questions and exits
	$(VENV)/bin/qaserve demo

test: setup  ## the whole suite, as CI runs it
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench-smoke: setup  ## both benches' short mode on the shipped models (what a fresh clone has)
	$(VENV)/bin/qaserve bench reader --data tests/fixtures/subjqa_mini.csv \
	  --calibration tests/fixtures/subjqa_mini.csv --limit 5 --output .qaserve/bench-smoke --quiet
	$(VENV)/bin/qaserve bench encoder --data tests/fixtures/subjqa_mini.csv --limit 20 \
	  --speed-passages 32 --output .qaserve/bench-smoke

loadtest: setup  ## start the graph, run the `check` Locust profile, check loadtests/constraints.yaml
	$(VENV)/bin/qaserve loadtest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

typecheck: setup  ## mypy, configured in pyproject.toml [tool.mypy]
	$(PY) scripts/typecheck.py

check: setup  ## lint + format check + type check, as CI runs it before the tests
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(PY) scripts/typecheck.py

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf .qaserve build *.egg-info
