#!/usr/bin/env bash
# The test tiers (markers in pyproject.toml: slurm = needs the dev cluster, slow = more than a few
# seconds or a real model):
#   scripts/test.sh [pytest args]       everything, as two pytest sessions at once: the SLURM tests
#                                       (one dev cluster: its daemons, ports and state exist once per
#                                       machine) and the rest; much of the suite waits on subprocesses,
#                                       sandboxes and SLURM jobs, so the two share the cores well
#   scripts/test.sh fast [pytest args]  not slurm and not slow
#   scripts/test.sh slow [pytest args]  slow and not slurm
# Each session lists its slowest tests; the SLURM session's output is printed when both are done.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    fast) shift; exec .venv/bin/python -m pytest -q -m "not slurm and not slow" --durations=10 "$@" ;;
    slow) shift; exec .venv/bin/python -m pytest -q -m "slow and not slurm" --durations=20 "$@" ;;
esac
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
