"""Where and with what a result was produced: code version, packages, host, scheduler ids."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("aletheia-hpc", "torch", "transformers", "peft", "accelerate", "bitsandbytes",
            "submitit", "hydra-core", "numpy")
REPO_ROOT = Path(__file__).resolve().parent.parent
# A launch snapshot has no .git; launch records the sha it was taken from in this file.
SNAPSHOT_SHA_FILE = ".snapshot-git-sha"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_state(root: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(commit sha, whether the tree had uncommitted changes); (None, None) outside a checkout."""
    snapshot = root / SNAPSHOT_SHA_FILE
    if snapshot.exists():
        sha, _, dirty = snapshot.read_text().strip().partition(" ")
        return sha, dirty == "dirty"
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def slurm_ids() -> dict[str, str]:
    keys = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID",
            "array_task_id": "SLURM_ARRAY_TASK_ID", "node": "SLURMD_NODENAME",
            "restart_count": "SLURM_RESTART_COUNT"}
    return {k: os.environ[v] for k, v in keys.items() if v in os.environ}


def host_name() -> str:
    return socket.gethostname()
