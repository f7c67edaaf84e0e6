# pubrelay — the two commands a fresh machine needs are `make run` and `make test`.
#
# Dependencies are installed from uv.lock (exact versions and hashes) by uv, which the
# first run installs from PyPI with pip into .tools/ (pinned below): nothing but python3
# and make is needed. `make lock` updates uv.lock after a change to pyproject.toml.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
UV_VERSION := 0.13.8
UV_DIR := .tools/uv-$(UV_VERSION)
UV := $(UV_DIR)/bin/uv
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_ROOT_USER_ACTION := ignore
# uv never downloads a Python of its own, and syncs into .venv as it is: an existing
# environment is kept (no UV_PYTHON: a pyenv shim path would make uv rebuild it each time).
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: run test lint format bench chaos docs clean lock system-deps bench-deps

$(UV):
	$(PYTHON) -m pip install --quiet --target $(UV_DIR) uv==$(UV_VERSION)

$(BIN)/python: | $(UV)
	$(UV) venv --quiet --python $(PYTHON) $(VENV)

# Two installations into the one .venv, each with its own stamp so neither undoes the other.
# Development (lint, test, bench, chaos; STAMP): exactly what uv.lock says, the project, the
# example plugin the tests load (group `dev`, editable) and the test tools (extra `test`),
# nothing else. Running (`make run`; RUN_STAMP): the project and its run-time dependencies
# only, no test tools, no example plugin (--no-dev), and --inexact so that it leaves an
# existing development installation alone instead of uninstalling it (which the next
# `make test` would then install again). --locked stops when uv.lock is out of date with
# pyproject.toml (run `make lock`). Each re-runs when either file changes.
$(STAMP): pyproject.toml uv.lock tests/plugins/example_plugin/pyproject.toml | $(BIN)/python
	$(UV) sync --locked --extra test
	touch $(STAMP)

$(RUN_STAMP): pyproject.toml uv.lock | $(BIN)/python
	$(UV) sync --locked --no-dev --inexact
	touch $(RUN_STAMP)

# Resolve the newest versions pyproject.toml allows and write them to uv.lock.
lock: | $(UV)
	$(UV) lock --upgrade

# Debian packages (installed only when missing; needs root or sudo):
# tests need promtool (package prometheus), redis-server, chromium (the console's
# browser test) and wrk (the benchmark, which the suite runs at small sizes:
# tests/e2e/test_bench_short.py).
define apt_install_missing
	@missing=""; \
	for pair in $(1); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

system-deps:
	$(call apt_install_missing,promtool:prometheus redis-server:redis-server chromium:chromium wrk:wrk)

bench-deps:
	$(call apt_install_missing,wrk:wrk)

run: $(RUN_STAMP)
	$(BIN)/pubrelay serve --console --outbox

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Every section, then issue 13's figures in one table (value, same-run baseline, ratio,
# target, met); all figures also go to build/bench-results.json. Some sections only:
# make bench BENCH_ARGS="memory backlog"; tiny sizes: BENCH_ARGS=--short.
bench: $(STAMP) bench-deps
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

# The fault scenarios at full size (about 15 minutes on 2 cores; docs/reliability.md).
# One scenario: .venv/bin/python -m tests.chaos --only rebalance; small sizes: --short.
chaos: $(STAMP) system-deps
	$(BIN)/python -m tests.chaos

# The README's configuration table, from the settings classes (tests/unit/test_docs.py
# fails when they drift).
docs: $(STAMP)
	$(BIN)/python -m pubrelay.settings_table

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
