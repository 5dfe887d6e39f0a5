# One command for the demo, one for the tests; each sets up what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.8
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
UV := $(CURDIR)/.tools/bin/uv
JARS := $(CURDIR)/.cache/jars
BLAS := $(CURDIR)/.cache/blas
S3_PORT ?= 5055
DATA ?= $(abspath ../shared/data/fruits360-sample/Training)
UI_PORT ?= 8080
UI_S3_PORT ?= 5056
SCHEDULE ?= off
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export AIRFLOW_HOME ?= $(CURDIR)/.cache/airflow
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__UNIT_TEST_MODE := False
export AIRFLOW__AWS__SESSION_FACTORY := fruits.aws_session.SharedLoaderSessionFactory
# Local-only dummy keys for the moto S3 server; real credentials come from the Airflow connection.
export AIRFLOW_CONN_AWS_DEFAULT ?= {"conn_type":"aws","login":"test","password":"test","extra":{"endpoint_url":"http://127.0.0.1:$(S3_PORT)","region_name":"eu-west-3"}}
export FRUITS_SPARK_JARS_DIR ?= $(JARS)
export PYTHONPATH := $(CURDIR)/plugins:$(CURDIR)/spark_jobs
export PYSPARK_PYTHON := $(BIN)/python
export PYSPARK_DRIVER_PYTHON := $(BIN)/python
export TF_CPP_MIN_LOG_LEVEL := 2

EMR_REQUIREMENTS ?= $(CURDIR)/bootstrap/requirements-emr.txt
AWS_CHECK_ARGS ?=

.PHONY: help setup venv jars blas demo test test-fast bench scale stage-weights lint clean s3-start s3-stop up down chromium shellcheck emr-requirements aws-check compose-check
help:
	@echo "make demo [DATA=folder]   run the whole pipeline locally on the Fruits-360 sample (or DATA)"
	@echo "make test                 run the test suite (real Airflow, Spark and S3 on localhost)"
	@echo "make test-fast            the tests that need no Spark and no DAG run (under a minute)"
	@echo "make lint                 ruff, and shellcheck on bootstrap/"
	@echo "make emr-requirements     export the cluster's pinned set (dependency group emr, with hashes) from uv.lock"
	@echo "make aws-check            read-only checks of a real AWS account before the first deployment (README)"
	@echo "make bench [BENCH_ARGS=--curve]   embed job vs the model's own speed, PCA refit, no-op run (JSON last)"
	@echo "make scale [SCALE_ARGS=...]   S3 requests, XCom bytes, step args, times over a 5,000-batch history (JSON last)"
	@echo "make up [UI_PORT=8080] [SCHEDULE=on]   Airflow UI + local S3 + local Spark on localhost"
	@echo "make down                 stop everything make up started"
	@echo "make compose-check        build the docker-compose stack (local stand-in images), run the DAG in it, tear down (5-30 min)"

$(UV):
	@echo "==> installing uv $(UV_VERSION) into .tools/"
	@$(PYTHON) -m venv $(CURDIR)/.tools
	@$(CURDIR)/.tools/bin/pip install -q uv==$(UV_VERSION)

# Bytecode compiled once here: where PYTHONDONTWRITEBYTECODE is set (these machines set it), Python never
# caches it, and every process (each Airflow task, Spark driver and worker, test worker) compiled pandas,
# Airflow and PySpark again on import: `import airflow.sdk` 4.6 s -> 2.1 s, `import pandas` 1.7 -> 0.5 s.
$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	@echo "==> creating the virtual environment from uv.lock, bytecode compiled (about 1 min cold)"
	@$(UV) sync --frozen --compile-bytecode --python $(PYTHON) -q
	@touch $@

venv: $(VENV)/.synced

# Spark's s3a connector: hadoop-aws + AWS SDK bundle, taken from a PyPI source archive that ships them.
$(JARS)/.ok: | $(UV)
	@echo "==> fetching the hadoop-aws jars for Spark's s3a (about 10 s)"
	@mkdir -p $(JARS)/dl
	@$(CURDIR)/.tools/bin/pip download -q --no-deps sagemaker-pyspark==1.4.5 -d $(JARS)/dl
	@tar xzf $(JARS)/dl/sagemaker_pyspark-1.4.5.tar.gz --strip-components=3 -C $(JARS) \
	  sagemaker_pyspark-1.4.5/deps/jars/hadoop-aws-3.3.1.jar sagemaker_pyspark-1.4.5/deps/jars/aws-java-sdk-bundle-1.11.901.jar
	@rm -rf $(JARS)/dl
	@touch $@

jars: $(JARS)/.ok

# Native BLAS/LAPACK for Spark ML's PCA fit: Debian's OpenBLAS, unpacked into .cache/blas (nothing is
# installed system-wide). Optional: where it cannot be had, Spark ML falls back to its Java BLAS.
$(BLAS)/.ok:
	@echo "==> fetching OpenBLAS for Spark ML (optional, about 5 s)"
	@rm -rf $(BLAS) && mkdir -p $(BLAS)/dl && cd $(BLAS)/dl && \
	  { apt-get download libopenblas0-pthread libgfortran5 libquadmath0 >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -qq >/dev/null 2>&1 && apt-get download libopenblas0-pthread libgfortran5 libquadmath0 >/dev/null 2>&1; }; } && \
	  for deb in *.deb; do dpkg-deb -x $$deb $(BLAS); done && rm -rf $(BLAS)/dl && touch $@ || \
	  { rm -rf $(BLAS); echo "==> OpenBLAS not available here: Spark ML keeps its Java BLAS (slower PCA fit)"; }

blas:
	@[ -f $(BLAS)/.ok ] || $(MAKE) --no-print-directory $(BLAS)/.ok

setup: venv jars blas

demo: setup
	@$(BIN)/python scripts/devstack.py demo --data "$(DATA)"

# Three pytest-xdist workers, each with its own S3 server, Airflow database and work folder
# (tests/conftest.py), one test module at a time: a DAG run leaves a core idle much of its time (JVM starts,
# Python imports, Airflow's bookkeeping, waits on S3), which the other workers fill. On 2 cores, fresh
# clones, one after the other: 682 s with two workers, 653 s with three (docs/performance.md, ninth round).
# TEST_WORKERS=0 runs the suite in one process.
# --no-loadscope-reorder: the modules go in conftest's order (longest first), not by their test count.
TEST_WORKERS ?= 3
test: setup chromium
	@$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The tests that need no Spark and no DAG run (marked `fast`): 98 tests in 18 s on 2 cores.
test-fast: venv
	@$(BIN)/python -m pytest -m fast $(PYTEST_ARGS)

bench: setup
	@$(BIN)/python scripts/bench.py $(BENCH_ARGS)

# What a run costs as the history grows: real DAG runs over a synthetic history of 5,000 batches.
scale: setup
	@$(BIN)/python scripts/scale.py $(SCALE_ARGS)

lint: venv shellcheck
	@$(BIN)/ruff check . && $(BIN)/ruff format --check .
	@shellcheck bootstrap/*.sh

# shellcheck from Debian's package, installed once (as the tests' chromium is).
shellcheck:
	@command -v shellcheck >/dev/null || { echo "==> installing shellcheck (apt)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq shellcheck >/dev/null; }

# What the bootstrap installs on every EMR node: the whole "emr" dependency group of uv.lock, every
# transitive package pinned, with hashes (pip then installs in hash-checking mode). Committed, and
# tests/test_bootstrap.py fails when it is not what this target writes from the current lock.
emr-requirements: | $(UV)
	@{ echo "# Generated by \`make emr-requirements\` from uv.lock (dependency group emr): do not edit."; \
	  echo "# Installed on every EMR node by bootstrap/install_python_deps.sh, hashes checked."; \
	  $(UV) export --frozen --format requirements.txt --only-group emr --no-emit-project --no-header --no-annotate; \
	} > $(EMR_REQUIREMENTS).tmp && mv $(EMR_REQUIREMENTS).tmp $(EMR_REQUIREMENTS)

# Read-only checks with your own AWS credentials (environment or profile), before the first deployment.
aws-check: venv
	@$(BIN)/python scripts/aws_check.py $(AWS_CHECK_ARGS)

up: setup
	@$(BIN)/python scripts/ui_stack.py up --port $(UI_PORT) --s3-port $(UI_S3_PORT) $(if $(filter on,$(SCHEDULE)),--schedule)

down:
	@$(BIN)/python scripts/ui_stack.py down

# docker-compose.yml for real: stand-in images built from Debian packages (no registry here), the project's
# image from docker/Dockerfile, the stack up, one DAG run through the REST API, outputs checked, all torn
# down. Installs Docker/debootstrap/Compose if missing. Not part of `make test` (README: docker-compose).
COMPOSE_CHECK_ARGS ?=
compose-check: venv
	@$(BIN)/python scripts/compose_check.py $(COMPOSE_CHECK_ARGS)

# Headless Chromium renders the run report in the tests: Debian's package, installed once.
chromium:
	@command -v chromium >/dev/null || { echo "==> installing chromium (apt, about 1 min)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# The MobileNetV2 weights from ../shared to FRUITS_WEIGHTS_URI, through the aws_default connection (the
# local S3 of `make demo` by default; set AIRFLOW_CONN_AWS_DEFAULT or S3_PORT for another stack).
stage-weights: venv
	@$(BIN)/python scripts/devstack.py stage-weights

s3-start: venv
	@$(BIN)/python scripts/devstack.py s3-start

s3-stop: venv
	@$(BIN)/python scripts/devstack.py s3-stop

clean:
	rm -rf .cache build test-artifacts demo-output
