# The two commands of the README, each self-sufficient on a fresh clone.
PY ?= python3
# Data: $FEDRUN_DATA, else the team machines' shared copy if present, else the user cache
# (where --download puts it when there is internet).
DATA ?= $(or $(FEDRUN_DATA),$(wildcard ../shared/data),$(HOME)/.cache/fedrun/data)
TORCH_HOME ?= $(or $(wildcard ../shared/torch_home),$(HOME)/.cache/torch)
export TORCH_HOME

.PHONY: install quickstart test lint

install:
	$(PY) -m pip install -q -e '.[dev]'

quickstart: install
	$(PY) -m fedrun train --preset quickstart --data-root "$(DATA)" --download --out-dir runs --name quickstart

test: install
	@bash slurm/start_cluster.sh || echo "make test: Slurm could not be started here; Slurm tests will be skipped"
	ruff check .
	$(PY) -m pytest -q
