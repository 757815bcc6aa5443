.PHONY: setup demo demo-full test test-fast test-slow

setup:
	bash scripts/setup.sh

# The main job on this machine: SmolLM2-135M-Instruct, both recipes, 3 seeds, paired timing, then
# the report (its path and headline are printed last).
demo: setup
	.venv/bin/aletheia-hpc launch campaign=demo
	.venv/bin/aletheia-hpc aggregate campaign=demo

# The demo plus MMLU 5-shot and GSM8K (at chance for a 135M model; several minutes more per cell).
demo-full: setup
	.venv/bin/aletheia-hpc launch campaign=demo_full
	.venv/bin/aletheia-hpc aggregate campaign=demo_full

# Everything, as CI runs it; it starts (and stops) the project's own SLURM dev cluster. The SLURM
# tests run in a session of their own beside the rest (scripts/test.sh).
test: setup
	bash scripts/test.sh

# The loop for a change: no SLURM, no real-model cell, nothing marked slow (about 2 minutes).
test-fast: setup
	bash scripts/test.sh fast

# The slow tests that are not SLURM tests.
test-slow: setup
	bash scripts/test.sh slow
