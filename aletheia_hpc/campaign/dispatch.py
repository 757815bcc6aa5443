"""The interface every dispatcher (local, SLURM) offers the campaign service, as submitit's Executor
does for its backends: what the scheduler says of recorded jobs, submit cells, cancel jobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aletheia_hpc.config import CellConfig


@dataclass(frozen=True)
class SchedulerView:
    """What the scheduler says of a campaign's jobs. ``source`` (campaign.state.SOURCES) says how
    much that is worth; ``problem``: why a better source could not be asked (one line), or None."""
    source: str
    states: dict[str, str] = field(default_factory=dict)  # job id -> scheduler state
    problem: str | None = None
    accounting: dict[str, dict] = field(default_factory=dict)  # job id -> sacct's usage fields
    # job id -> how its earlier runs ended, e.g. ["NODE_FAIL on node1"]: a requeued job's history
    earlier_runs: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Submission:
    cells: int
    arrays: int = 0  # sbatch calls (SLURM)
    classes: int = 0  # resource classes
    exit_codes: dict[str, int] = field(default_factory=dict)  # cell_id -> worker exit (local)
    stopped_by: str | None = None  # local: the signal (SIGTERM, SIGHUP) that stopped the launch


class Dispatcher(Protocol):
    kind: str

    def observe(self, jobs: dict[str, dict]) -> SchedulerView:
        """The scheduler's word on ``jobs`` (cell_id -> latest job record of this cluster)."""

    def submit(self, cells: list[CellConfig], results_dir: Path, snapshots: dict[str, Path]) -> Submission:
        """Run or queue ``cells`` with the code in ``snapshots`` (campaign part -> snapshot dir),
        recording each cell's job in its directory."""

    def cancel(self, job_ids: list[str]) -> list[str]:
        """Cancel these jobs; returns the ids cancelled."""
