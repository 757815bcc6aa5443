"""The campaign's files: one directory per cell, holding its config, row, attempt logs, checkpoints.

State comes from these files first: a valid ok row means done, whatever the scheduler says.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aletheia_hpc.config import CellConfig
from aletheia_hpc.row import ROW_FILENAME, InvalidRow, read_row

CELL_CONFIG_FILE = "cell.json"
LOG_DIR = "logs"
REQUEUE_EXIT_CODE = 3  # a worker that checkpointed on request and must run again
# What a cell's attempts leave for the next one (the worker writes them; a rerun from scratch sets
# them aside): Trainer checkpoints, the times of the steps they hold, one record per attempt.
CHECKPOINT_DIR = "checkpoints"
PROGRESS_FILE = "progress.json"
ATTEMPTS_FILE = "attempts.json"
PROGRESS_FILES = (CHECKPOINT_DIR, PROGRESS_FILE, ATTEMPTS_FILE)


def unique_stamp() -> str:
    """A timestamp for file names: sorts in time order, and two calls never give the same one."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**9:09d}"


def worker_command(work_dir: Path, *, progress: bool, cpu_fallback: bool) -> list[str]:
    """The command line that runs one cell directory's worker (both dispatchers start it so)."""
    return [sys.executable, "-u", "-m", "aletheia_hpc.worker", str(work_dir),
            *(["--progress"] if progress else []), *(["--cpu-fallback"] if cpu_fallback else [])]


def campaign_dir(results_dir: Path, campaign: str) -> Path:
    return Path(results_dir) / campaign


def cell_path(results_dir: Path, cell: CellConfig) -> Path:
    return campaign_dir(results_dir, cell.campaign) / "cells" / cell.cell_id


def prepare_cell_dir(results_dir: Path, cell: CellConfig) -> Path:
    """Create the cell's directory and write its resolved config (what the worker will run)."""
    path = cell_path(results_dir, cell)
    (path / LOG_DIR).mkdir(parents=True, exist_ok=True)
    tmp = path / f".{CELL_CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(cell.to_dict(), indent=1))
    tmp.replace(path / CELL_CONFIG_FILE)
    return path


@dataclass
class RowState:
    row: dict | None  # the valid row, if any
    problem: str | None  # why a row file exists but is not valid


def row_state(results_dir: Path, cell: CellConfig) -> RowState:
    path = cell_path(results_dir, cell) / ROW_FILENAME
    if not path.exists():
        return RowState(None, None)
    try:
        return RowState(read_row(path), None)
    except InvalidRow as exc:
        return RowState(None, str(exc))


def is_done(results_dir: Path, cell: CellConfig) -> bool:
    row = row_state(results_dir, cell).row
    return row is not None and row["status"] == "ok"


def move_row_aside(results_dir: Path, cell: CellConfig) -> Path | None:
    """Rename the cell's row to row.json.replaced-<timestamp> before it runs again (never deleted)."""
    row = cell_path(results_dir, cell) / ROW_FILENAME
    if not row.exists():
        return None
    dest = row.with_name(f"{ROW_FILENAME}.replaced-{unique_stamp()}")
    row.rename(dest)
    return dest


def move_progress_aside(results_dir: Path, cell: CellConfig) -> list[Path]:
    """Rename the cell's checkpoints, step-time progress and attempt log, so that a forced rerun starts
    from scratch and its row counts only its own attempts."""
    work, stamp = cell_path(results_dir, cell), unique_stamp()
    moved = []
    for name in PROGRESS_FILES:
        if (work / name).exists():
            moved.append((work / name).rename(work / f"{name}.replaced-{stamp}"))
    return moved
