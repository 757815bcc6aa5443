.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# The main job on this machine: SmolLM2-135M-Instruct, both recipes, 3 seeds, then the report.
demo: setup
	.venv/bin/aletheia-hpc launch campaign=demo
	.venv/bin/aletheia-hpc aggregate campaign=demo

# The whole test suite; it starts (and stops) the project's own SLURM dev cluster. The SLURM tests
# run in a session of their own beside the rest (scripts/test.sh).
test: setup
	bash scripts/test.sh
