# One entry point for people and CI. Heavy downloads live in a cache outside the clone,
# keyed by the lock file's hash, so a clean clone re-uses them.
SHELL := /bin/bash
PYTHON_BIN ?= $(shell $$(command -v python3.11 || command -v python3) -c 'import sys; print(sys.executable)')
CACHE_DIR ?= $(HOME)/.cache/recstream
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-16)
VENV_CACHE := $(CACHE_DIR)/venv-$(LOCK_HASH)
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export RECSTREAM_CACHE_DIR := $(CACHE_DIR)
export PYTHONPATH := $(CURDIR)

.PHONY: setup venv kafka-jars up down demo test lint bench schemas clean

setup: venv kafka-jars  ## idempotent install: venv, Python deps, Kafka jars, tritonserver (in nvidia-pytriton)

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock
	@$(PYTHON_BIN) -m uv --version >/dev/null 2>&1 || $(PYTHON_BIN) -m pip install -q "uv>=0.4,<1"
	@if [ ! -f $(VENV_CACHE)/.complete ]; then \
	  echo "installing Python environment into $(VENV_CACHE) (first time only)"; \
	  rm -rf $(VENV_CACHE) && $(PYTHON_BIN) -m uv venv -q --python $(PYTHON_BIN) $(VENV_CACHE) && \
	  VIRTUAL_ENV=$(VENV_CACHE) $(PYTHON_BIN) -m uv pip install -q -r requirements.lock && \
	  VIRTUAL_ENV=$(VENV_CACHE) $(PYTHON_BIN) -m uv pip install -q --no-deps 'recbole==1.2.1' && \
	  touch $(VENV_CACHE)/.complete ; \
	fi
	@ln -sfn $(VENV_CACHE) $(VENV)
	@touch $@

kafka-jars: venv
	@$(PY) -m infra.kafka_broker install

up: setup
	@$(PY) -m recstream.cli stack up

down:
	@$(PY) -m recstream.cli stack down

demo: setup
	@$(PY) -m recstream.cli demo

test: setup
	@$(PY) -m pytest

lint: setup
	@$(VENV)/bin/ruff check .

schemas: venv
	@$(PY) -m recstream.contracts.export

bench: setup
	@for b in $$(ls bench/bench_*.py | sed 's/.*bench_\(.*\)\.py/\1/'); do $(MAKE) --no-print-directory bench-$$b || exit 1; done

bench-%: setup
	@$(PY) -m bench.bench_$*

clean:
	rm -rf run artifacts .pytest_cache
