# One entry point for people and CI. Heavy downloads live in a cache outside the clone,
# keyed by the lock file's hash, so a clean clone re-uses them.
SHELL := /bin/bash
PYTHON_BIN ?= $(shell $$(command -v python3.11 || command -v python3) -c 'import sys; print(sys.executable)')
CACHE_DIR ?= $(HOME)/.cache/recstream
# recbole is installed only for the MovieLens-100k files it ships (its own deps are not needed)
RECBOLE_PIN := recbole==1.2.1
# The environment is keyed by everything that decides its contents: the lock file, the extra pin and
# the interpreter's version (the Triton python backend's stub must match it).
PYTHON_VERSION := $(shell $(PYTHON_BIN) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK_HASH := $(shell { cat requirements.lock; echo "$(RECBOLE_PIN) python$(PYTHON_VERSION)"; } | sha256sum | cut -c1-16)
VENV_CACHE := $(CACHE_DIR)/venv-$(LOCK_HASH)
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export RECSTREAM_CACHE_DIR := $(CACHE_DIR)
export PYTHONPATH := $(CURDIR)

.PHONY: setup venv venv-guard kafka-jars prometheus browser up down demo train test test-fast lint bench schemas clean

setup: venv kafka-jars prometheus browser  ## idempotent install: venv, Python deps, Kafka jars, tritonserver (in nvidia-pytriton)

venv: $(VENV_CACHE)/.complete
	@ln -sfn $(VENV_CACHE) $(VENV)

# Before anything is installed: ln -sfn into an existing real directory would put the link inside
# it, and every target would go on with that unmanaged environment.
venv-guard:
	@if [ -e $(VENV) ] && [ ! -L $(VENV) ]; then \
	  echo "$(VENV) is a directory, not the link to the locked environment that make setup manages;" \
	       "move it aside (mv $(VENV) $(VENV).old) and run make setup again" >&2; exit 1; fi

# uv: the one on PATH, else PYTHON_BIN's module, else installed once into a small venv in the cache
# (a system Python such as Debian's refuses `pip install` outside a venv, PEP 668).
UV_BOOTSTRAP := $(CACHE_DIR)/uv-bootstrap
FIND_UV = command -v uv 2>/dev/null \
	|| { $(PYTHON_BIN) -m uv --version >/dev/null 2>&1 && echo "$(PYTHON_BIN) -m uv"; } \
	|| { { [ -x $(UV_BOOTSTRAP)/bin/uv ] || { $(PYTHON_BIN) -m venv $(UV_BOOTSTRAP) \
	       && $(UV_BOOTSTRAP)/bin/pip install -q "uv>=0.4,<1"; }; } >&2 && echo $(UV_BOOTSTRAP)/bin/uv; }

# The environment's folder name carries the key: a new lock means a new environment. A lock on the
# cache serialises clones and CI jobs that set up at once (one would delete what the other installs);
# .complete is written inside it, last, so an interrupted install is never taken for a finished one.
$(VENV_CACHE)/.complete: | venv-guard
	@mkdir -p $(CACHE_DIR); exec 9>$(CACHE_DIR)/venv.lock; flock 9; \
	if [ -e $@ ]; then exit 0; fi; \
	uv="$$($(FIND_UV))" || { echo "no uv, and none could be installed (needs python3-venv)" >&2; exit 1; }; \
	echo "installing the Python environment into $(VENV_CACHE) with $$uv (once per lock file and Python)"; \
	rm -rf $(VENV_CACHE) && $$uv venv -q --python $(PYTHON_BIN) $(VENV_CACHE) \
	&& $$uv pip install -q --python $(VENV_CACHE)/bin/python -r requirements.lock \
	&& $$uv pip install -q --python $(VENV_CACHE)/bin/python --no-deps '$(RECBOLE_PIN)' \
	&& touch $@

APT_GET = $$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get

prometheus:  ## Debian's Prometheus for tests/ops/test_prometheus_scrape.py (skipped when on PATH)
	@command -v prometheus >/dev/null 2>&1 || { $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends prometheus; }

browser:  ## headless Chromium for tests/services/test_playground_browser.py (skipped when on PATH)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { $(APT_GET) update -qq && $(APT_GET) install -y -qq chromium chromium-driver; }

kafka-jars: venv
	@$(PY) -m infra.kafka_cli install

up: setup
	@$(PY) -m recstream.ops.cli stack up

down:
	@$(PY) -m recstream.ops.cli stack down

demo: setup
	@$(PY) -m recstream.ops.cli demo

DATASET ?= ml-100k
train: setup  ## the served models on DATASET (name or generic-form folder) -> new versions in model_repo/
	@$(PY) -m recstream.ops.cli train --dataset $(DATASET) $(ARGS)

test: setup
	@$(PY) -m pytest

test-fast: setup  ## the inner loop: no broker, no tritonserver, nothing marked slow
	@$(PY) -m pytest -m "not kafka and not triton and not slow"

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

schemas: venv
	@$(PY) -m recstream.contracts.export

bench: setup
	@for b in $$(ls bench/bench_*.py | sed 's/.*bench_\(.*\)\.py/\1/'); do $(MAKE) --no-print-directory bench-$$b || exit 1; done

bench-%: setup
	@$(PY) -m bench.bench_$* $(ARGS)

clean:  ## stops a running local stack first: its PID files live under run/
	@if [ -x $(PY) ] && [ -d run ]; then $(PY) -m recstream.ops.cli stack down; fi
	rm -rf run artifacts .pytest_cache
