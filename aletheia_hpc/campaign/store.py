"""The campaign's files: one directory per cell, holding its config, row, attempt logs, checkpoints.

State comes from these files first: a valid ok row means done, whatever the scheduler says.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aletheia_hpc.config import CellConfig, ConfigError
from aletheia_hpc.files import atomic_write
from aletheia_hpc.provenance import REPO_ROOT, SNAPSHOT_SHA_FILE, git_state
from aletheia_hpc.row import (ACCOUNTING_FILENAME, ROW_FILENAME, STAGE_DECISION_FILE, InvalidRow,
                              InvalidStageDecision, read_accounting, read_row)
from aletheia_hpc.row import read_stage_decision as read_decision_file

CELL_CONFIG_FILE = "cell.json"
LOG_DIR = "logs"
# One line per job that ran or runs the cell (SLURM array task or local launch); the last is current.
JOBS_FILE = "jobs.jsonl"
REQUEUE_EXIT_CODE = 3  # a worker that checkpointed on request and must run again
NAN_EXIT_CODE = 4  # a cell that stopped on a non-finite loss (its nan_abort row is written)
SNAPSHOT_DIRS = ("aletheia_hpc", "conf", "campaigns")
# What a cell's attempts leave for the next one (the worker writes them; a rerun from scratch sets
# them aside): Trainer checkpoints, the times of the steps they hold, one record per attempt, the
# backward-drop plan the first attempt chose (a resumed attempt replays its masks).
CHECKPOINT_DIR = "checkpoints"
PROGRESS_FILE = "progress.json"
ATTEMPTS_FILE = "attempts.json"
DROP_PLAN_FILE = "drop_plan.json"
PROGRESS_FILES = (CHECKPOINT_DIR, PROGRESS_FILE, ATTEMPTS_FILE, DROP_PLAN_FILE)


def unique_stamp() -> str:
    """A timestamp for file names: sorts in time order, and two calls never give the same one."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**9:09d}"


def worker_command(work_dir: Path, *, progress: bool, cpu_fallback: bool) -> list[str]:
    """The command line that runs one cell directory's worker (both dispatchers start it so)."""
    return [sys.executable, "-u", "-m", "aletheia_hpc.worker", str(work_dir),
            *(["--progress"] if progress else []), *(["--cpu-fallback"] if cpu_fallback else [])]


def campaign_dir(results_dir: Path, campaign: str) -> Path:
    return Path(results_dir) / campaign


def stage_decision_path(results_dir: Path, campaign: str, stage: int) -> Path:
    return campaign_dir(results_dir, campaign) / STAGE_DECISION_FILE.format(stage=stage)


def read_stage_decision(results_dir: Path, campaign: str, stage: int) -> dict | None:
    """row.read_stage_decision of the campaign; a corrupt file is a ConfigError naming it."""
    try:
        return read_decision_file(campaign_dir(results_dir, campaign), stage)
    except InvalidStageDecision as exc:
        raise ConfigError(str(exc)) from None


def write_stage_decision(results_dir: Path, campaign: str, decision: dict) -> Path:
    path = stage_decision_path(results_dir, campaign, decision["stage"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(decision, indent=1, sort_keys=True) + "\n")
    return path


def cell_path(results_dir: Path, cell: CellConfig) -> Path:
    return campaign_dir(results_dir, cell.campaign) / "cells" / cell.cell_id


def prepare_cell_dir(results_dir: Path, cell: CellConfig) -> Path:
    """Create the cell's directory and write its resolved config (what the worker will run)."""
    path = cell_path(results_dir, cell)
    (path / LOG_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write(path / CELL_CONFIG_FILE, json.dumps(cell.to_dict(), indent=1), fsync=False)
    return path


def append_job(results_dir: Path, cell: CellConfig, record: dict) -> None:
    """Record a job of ``cell`` in its own directory (so every part of a campaign keeps its own)."""
    with open(cell_path(results_dir, cell) / JOBS_FILE, "a") as handle:
        handle.write(json.dumps({"cell_id": cell.cell_id, **record}) + "\n")


def latest_job(results_dir: Path, cell: CellConfig) -> dict | None:
    """The cell's current job record (its last line), or None. A torn last line (a writer killed
    mid-line) is skipped."""
    path = cell_path(results_dir, cell) / JOBS_FILE
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def take_snapshot(results_dir: Path, parts: list[str], source: Path = REPO_ROOT) -> dict[str, Path]:
    """Copy the code a launch runs (aletheia_hpc/, conf/, campaigns/ and the git sha) into
    ``<part>/snapshots/<timestamp>`` of every campaign part; the first part gets a copy, the others
    hard links to it, so that each part's directory holds the code its jobs run."""
    stamp, out = unique_stamp(), {}
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in parts:
        dest = (campaign_dir(results_dir, part) / "snapshots" / stamp).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if out:
            first = next(iter(out.values()))
            shutil.copytree(first, dest, copy_function=_link_or_copy)
        else:
            dest.mkdir()
            for name in SNAPSHOT_DIRS:
                if (source / name).is_dir():
                    shutil.copytree(source / name, dest / name, ignore=ignore)
            sha, dirty = git_state(source)
            (dest / SNAPSHOT_SHA_FILE).write_text(f"{sha or 'unknown'}{' dirty' if dirty else ''}\n")
        out[part] = dest
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def launch_lock_path(results_dir: Path, part: str) -> Path:
    """The file a local launch of campaign part ``part`` holds locked while it runs."""
    return campaign_dir(results_dir, part) / "launch.lock"


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


@dataclass
class Progress:
    step: int  # optimizer steps done so far (over all attempts)
    step_times_s: list[float]


def read_progress(results_dir: Path, cell: CellConfig) -> Progress | None:
    """What the worker last wrote to progress.json (after every step), or None."""
    try:
        saved = json.loads((cell_path(results_dir, cell) / PROGRESS_FILE).read_text())
        return Progress(int(saved["step"]), [float(t) for t in saved["step_times_s"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cell_logs(work_dir: Path) -> list[Path]:
    """The cell's attempt logs (local and SLURM), oldest first."""
    return sorted((Path(work_dir) / LOG_DIR).glob("*.log"), key=lambda p: p.stat().st_mtime)


def find_cell_dir(results_dir: Path, cell_id_prefix: str) -> Path:
    """The one cell directory (of any campaign under ``results_dir``) whose id starts with the prefix."""
    found = sorted(Path(results_dir).glob(f"*/cells/{cell_id_prefix}*"))
    if len(found) != 1:
        raise ValueError(f"{len(found)} cells under {results_dir} match {cell_id_prefix!r}"
                         + (f": {', '.join(p.name for p in found)}" if found else "; check results_dir="))
    return found[0]


def log_chunks(work_dir: Path, follow: bool, poll_s: float = 1.0, settle_s: float = 2.0):
    """Yield what the cell's newest attempt log holds; with ``follow``, then what is appended, also
    across a new attempt (its name yielded first, as ``tail -F`` does), until the cell has a row and
    its log has been quiet for ``settle_s`` (the worker prints its last lines after writing the row)."""
    current, offset, quiet_since = None, 0, time.monotonic()
    while True:
        newest = cell_logs(work_dir)
        if current is not None:  # to its end, also when a newer attempt has started
            with open(current, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            offset += len(chunk)
            if chunk:
                quiet_since = time.monotonic()
                yield chunk
        if newest and newest[-1] != current:
            if current is not None:
                yield f"\n==> {newest[-1].name} <==\n".encode()
            current, offset = newest[-1], 0
            continue
        if not follow or ((Path(work_dir) / ROW_FILENAME).exists() and time.monotonic() - quiet_since >= settle_s):
            return
        time.sleep(poll_s)


def gpu_hours(usage: dict) -> float:
    return usage["elapsed_s"] * usage["alloc_gpus"] / 3600


def record_accounting(results_dir: Path, cell: CellConfig, job_id: str, usage: dict) -> dict:
    """Keep ``usage`` of job ``job_id`` in the cell's accounting.json (written only when it changed);
    returns the file's content (layout: row.ACCOUNTING_FILENAME)."""
    work = cell_path(results_dir, cell)
    known = read_accounting(work) or {"jobs": {}}
    if known["jobs"].get(job_id) != usage:
        known["jobs"][job_id] = usage
        known["gpu_hours"] = sum(gpu_hours(u) for u in known["jobs"].values())
        known["elapsed_s"] = sum(u["elapsed_s"] for u in known["jobs"].values())
        atomic_write(work / ACCOUNTING_FILENAME, json.dumps(known, indent=1), fsync=False)
    return known
