#!/usr/bin/env bash
# The whole test suite as two pytest sessions at once: the SLURM tests (one dev cluster: its daemons,
# ports and state exist once per machine) and the rest. Much of the suite waits on subprocesses,
# sandboxes and SLURM jobs, so the two share the cores well. Arguments go to both sessions.
# Each lists its slowest tests; the SLURM session's output is printed when both are done.
set -uo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pytest -q -m slurm --durations=10 --basetemp="$work/slurm" "$@" > "$work/slurm.log" 2>&1 &
slurm=$!
.venv/bin/python -m pytest -q -m "not slurm" --durations=20 --basetemp="$work/rest" "$@"
rest=$?
wait "$slurm"
slurm_rc=$?
echo "---------------------------------------- SLURM tests (pytest -m slurm)"
cat "$work/slurm.log"
echo "SLURM tests exit $slurm_rc, the rest exit $rest"
[ "$rest" -eq 0 ] && [ "$slurm_rc" -eq 0 ]
