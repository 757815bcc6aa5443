.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# The main job on this machine: the demo campaign, both recipes, then the report.
demo: setup
	.venv/bin/aletheia-hpc launch campaign=default
	.venv/bin/aletheia-hpc aggregate campaign=default

# The whole test suite; it starts (and stops) the project's own SLURM dev cluster.
test: setup
	.venv/bin/python -m pytest -q
