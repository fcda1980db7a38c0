# The whole set-up on a fresh machine is `make run` then `make test`; each creates .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MPLBACKEND := Agg

.PHONY: run test ui lint clean bench

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## the main job: the pipeline on the embedded synthetic default
	dermaflow run

test: $(STAMP)  ## the test suite (real DVC, GX, MLflow, Prefect, onnxruntime in tmp dirs)
	$(VENV)/bin/python -m pytest -n 2 --durations=15 tests

ui: $(STAMP)  ## the MLflow UI over mlruns/mlflow.db on http://127.0.0.1:5000
	dermaflow ui

bench: $(STAMP)  ## benchmarks -> bench/results/<device>.json (BENCH_ARGS="--all" adds the pipeline)
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check tasks flows tests bench
	$(VENV)/bin/ruff format --check tasks flows tests bench

clean:
	rm -rf data/raw data/manifest.parquet data/splits data/prepared data/reports metrics reports
