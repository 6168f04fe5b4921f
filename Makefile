# The two commands of the README, each self-sufficient on a fresh clone.
PY ?= python3
# Data: $FEDRUN_DATA, else the team machines' shared copy if present, else the user cache
# (where --download puts it when there is internet).
DATA ?= $(or $(FEDRUN_DATA),$(wildcard ../shared/data),$(HOME)/.cache/fedrun/data)
TORCH_HOME ?= $(or $(wildcard ../shared/torch_home),$(HOME)/.cache/torch)
export TORCH_HOME

.PHONY: install quickstart cpu-table test lint test-assets

install:
	$(PY) -m pip install -q -e '.[dev]'

# Two ranks, a client each, 1 thread each: 1.38x the training speed of one 2-thread process hosting both
# clients in turn on an idle 2-core Xeon (README). Rank 0 ends by scoring the samples on all cores.
quickstart: install
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m fedrun train --preset quickstart --data-root "$(DATA)" --download --out-dir runs --name quickstart
	@echo "make quickstart: the grid is runs/quickstart/samples/final.png, FID and KID are in runs/quickstart/fid.json"

# The paper's Table 1 at CPU scale (BENCHMARKS.md): 34 runs one after the other, then the table.
cpu-table: install
	$(PY) -m fedrun sweep --preset cpu-table --grid sweeps/cpu-table.yaml --data-root "$(DATA)" --download \
	  --out-dir runs --name cpu-table --local
	$(PY) -m fedrun report runs/cpu-table

# Lint steps of `make test` (one place for them).
lint: install
	ruff check .
	ruff format --check .

# What the tests need from outside the repo (Fashion-MNIST, the FID Inception weights): looked for where
# the app looks, downloaded there by the app's own download paths if missing (offline: one line each on
# what to put where), plus reference FID statistics computed once. tests/conftest.py decides where.
test-assets: install
	$(PY) tests/fetch_assets.py

# Where slurm/start_cluster.sh keeps its pid files (its FEDRUN_SLURM_BASE).
SLURM_BASE ?= $(or $(FEDRUN_SLURM_BASE),/tmp/fedrun-slurm)

# pytest's exit status is kept; the last lines say whether a local Slurm is left running and how to stop it.
# pytest runs the multinode tests too (tests/test_multinode.py): as root they make two hosts of network
# namespaces and a two-node Slurm of their own, and remove them; elsewhere they skip (fail with CI=true).
test: install lint test-assets
	@bash slurm/start_cluster.sh || echo "make test: Slurm could not be started here; Slurm tests will be skipped"
	@echo "$(PY) -m pytest -q"; $(PY) -m pytest -q; rc=$$?; \
	pid=$$(cat "$(SLURM_BASE)/run/slurmctld.pid" 2>/dev/null); \
	if [ -n "$$pid" ] && [ -d "/proc/$$pid" ]; then \
	  echo "make test: a local Slurm is still running for the Slurm tests (slurmctld pid $$pid, with slurmd," \
	       "slurmdbd, mariadbd and munged); it keeps running until you stop it:"; \
	  echo "make test:   sudo bash slurm/stop_cluster.sh     (PURGE=1 also deletes $(SLURM_BASE))"; \
	fi; exit $$rc
