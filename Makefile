.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# The main job on this machine: SmolLM2-135M-Instruct, both recipes, 3 seeds, then the report.
demo: setup
	.venv/bin/aletheia-hpc launch campaign=demo
	.venv/bin/aletheia-hpc aggregate campaign=demo

# The whole test suite; it starts (and stops) the project's own SLURM dev cluster. Two workers
# (pytest-xdist): much of the suite waits on subprocesses, sandboxes and SLURM jobs; the SLURM
# tests share one worker. The slowest tests are listed at the end.
PYTEST_WORKERS ?= 2
test: setup
	.venv/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=30
