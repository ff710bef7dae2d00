# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The UI's and the demo's instance (SQLite); tests make their own. Not taken from the
# environment: a DAGSTER_HOME exported for another instance would get this dagster.yaml copied
# over its own, and the demo's runs. `make dev DAGSTER_HOME=/abs/path` still picks another.
DAGSTER_HOME := $(CURDIR)/.dagster_home
# The UI's port: `make dev PORT=3001` where 3000 is taken (not taken from the environment, where PORT
# often means something else).
PORT := 3000

.PHONY: demo test dev install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned in setup.py as well; installing it first keeps pip on the CPU build on disk.
$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/sd-assets demo

# One worker a core, at most four: each starts webservers, daemons and runs of its own. A test
# that hangs (a process or a lock waited on forever) fails after 10 minutes, with its stack, not CI.
test: install
	$(BIN)/python -m pytest sd_assets_tests -q -p no:cacheprovider -n auto --maxprocesses 4 --timeout 600

dev: install $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

clean:
	rm -rf data data-sd15 .dagster_home deep-cache-quality
