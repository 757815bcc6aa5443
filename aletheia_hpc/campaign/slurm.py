"""Run a campaign on SLURM: job arrays per resource class, one sacct per status, requeue on USR2.

Orchestration only: nothing here imports torch or the worker. Layout under
``<results_dir>/<campaign>/``:

``cells/<cell_id>/``  the cell's files (store.py); the worker's output of each attempt goes to
                      ``logs/slurm-<job>-r<restart>.log`` there.
``snapshots/<ts>/``   the code a launch runs (aletheia_hpc/, conf/, campaigns/ and
                      ``.snapshot-git-sha``); jobs run with PYTHONPATH and cwd there, so editing
                      the checkout never changes a running or requeued job.
``submitit/``         submitit's pickles and the per-task scheduler logs.
``jobs.jsonl``        one line per submitted cell: cell_id, job_id (``A_T``), array_job_id, task,
                      snapshot, submitted_at, cluster. The last line of a cell is its current job.

Requeue: the job function runs ``python -m aletheia_hpc.worker CELL_DIR`` as a child process
and forwards SIGUSR2 (SLURM's ``--signal=USR2@signal_delay_s`` pre-timeout warning) and SIGTERM to
it. The worker checkpoints and exits with REQUEUE_EXIT_CODE; if the warning was USR2 the job
function then runs ``scontrol requeue`` on its own job, and the next attempt resumes from the
checkpoint in the cell directory. A SIGTERM alone (scancel) is not requeued.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from aletheia_hpc.campaign.store import (LOG_DIR, REQUEUE_EXIT_CODE, campaign_dir, cell_path,
                                         prepare_cell_dir, row_state, unique_stamp, worker_command)
from aletheia_hpc.config import CellConfig, ClusterConfig
from aletheia_hpc.provenance import REPO_ROOT, SNAPSHOT_SHA_FILE, git_state

JOBS_FILE = "jobs.jsonl"
SNAPSHOT_DIRS = ("aletheia_hpc", "conf", "campaigns")
MAX_REQUEUES = 20  # a cell that asks for more is failed (its time limit is far too short)
# A job that sacct does not know counts as just submitted for this long; after that it is lost
# (accounting purged, another cluster's or a wiped cluster's job id) and its cell is missing.
ACCOUNTING_GRACE_S = 300

ACTIVE = {"PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
          "REQUEUE_FED": "pending", "RESIZING": "pending", "SUSPENDED": "pending",
          "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
          "SIGNALING": "running", "STAGE_OUT": "running", "STOPPED": "running"}


# ------------------------------------------------------------------ what runs inside the job

class CellJob:
    """The submitit function of every array task: run the worker on one cell directory."""

    def __init__(self, snapshot: str | None = None, cpu_fallback: bool = False):
        self.snapshot, self.cpu_fallback = snapshot, cpu_fallback

    def __call__(self, cell_dir: str) -> int:
        work = Path(cell_dir)
        env = dict(os.environ)
        # torch would start one thread per core of the node, not per CPU this task was given
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            env.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
        if self.snapshot:
            env["PYTHONPATH"] = self.snapshot + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        job = _own_job_id()
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        (work / LOG_DIR).mkdir(parents=True, exist_ok=True)
        log_path = work / LOG_DIR / f"slurm-{job}-r{restart}.log"
        got: list[int] = []
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(worker_command(work, progress=False, cpu_fallback=self.cpu_fallback),
                                    stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.snapshot or None)

            def forward(signum, _frame):
                got.append(signum)
                try:
                    proc.send_signal(signum)
                except OSError:
                    pass

            signal.signal(signal.SIGUSR2, forward)
            signal.signal(signal.SIGTERM, forward)
            code = proc.wait()
        print(f"worker for {work.name} exited {code} (signals {got})", flush=True)
        if code == REQUEUE_EXIT_CODE:
            if signal.SIGUSR2 in got and int(restart) < MAX_REQUEUES:
                subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
                print(f"requeued {job}", flush=True)
                return code
            if signal.SIGUSR2 in got:
                raise RuntimeError(f"cell {work.name} requeued {restart} times; giving up")
            return code  # stopped by scancel / preemption: the scheduler decides
        if code != 0:
            raise RuntimeError(f"worker for cell {work.name} exited with code {code}; see {log_path}")
        return code


def _own_job_id() -> str:
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", "nojob")


# ------------------------------------------------------------------ resources and sbatch scripts

@dataclass(frozen=True, order=True)
class ResourceClass:
    gpus: int
    cpus: int
    mem_gb: int
    time_min: int
    partition: str


def resource_class(cell: CellConfig, cluster: ClusterConfig) -> ResourceClass:
    r = cell.model.resources
    minutes = min(r.time_min, cluster.max_time_min) if cluster.max_time_min > 0 else r.time_min
    return ResourceClass(r.gpus, r.cpus, r.mem_gb, minutes, cluster.partition or "")


def executor_parameters(cls: ResourceClass, cluster: ClusterConfig, snapshot: Path | str,
                        job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one resource class."""
    params: dict[str, Any] = {
        "job_name": job_name, "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": cls.cpus,
        "mem": f"{cls.mem_gb}GB", "time": cls.time_min, "signal_delay_s": cluster.signal_delay_s,
        "array_parallelism": cluster.array_parallelism, "stderr_to_stdout": True,
        "setup": [*cluster.setup, f"export PYTHONPATH={shlex.quote(str(snapshot))}",
                  f"cd {shlex.quote(str(snapshot))}"],
        "additional_parameters": {"requeue": True},
    }
    if cls.gpus:
        params["gres"] = f"gpu:{cls.gpus}"
    if cls.partition:
        params["partition"] = cls.partition
    if cluster.account:
        params["account"] = cluster.account
    if cluster.qos:
        params["qos"] = cluster.qos
    return params


def sbatch_script(cls: ResourceClass, cluster: ClusterConfig, snapshot: Path | str, folder: Path | str,
                  n_tasks: int, job_name: str = "aletheia", python: str | None = None) -> str:
    """The sbatch script submitit writes for an array of ``n_tasks`` cells of one class (no cluster
    needed: for inspection and golden tests)."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = python or sys.executable
    params = executor_parameters(cls, cluster, snapshot, job_name)
    command = f"{python} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=str(folder), map_count=n_tasks if n_tasks > 1 else None,
                               **params)


_max_array_cache: dict[str, int] = {}


def max_array_size(cluster: ClusterConfig) -> int:
    """cluster.max_array_size when > 0, else MaxArraySize from ``scontrol show config`` (read once)."""
    if cluster.max_array_size > 0:
        return cluster.max_array_size
    key = os.environ.get("SLURM_CONF", "")
    if key not in _max_array_cache:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        value = 1001
        for line in out.splitlines():
            name, _, rest = line.partition("=")
            if name.strip() == "MaxArraySize":
                value = int(rest.strip())
        _max_array_cache[key] = value
    # indices run 0..MaxArraySize-1, so an array has at most MaxArraySize tasks
    return _max_array_cache[key]


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ------------------------------------------------------------------ snapshot and job records

def take_snapshot(camp_dir: Path, source: Path = REPO_ROOT) -> Path:
    """Copy the code a launch runs into ``snapshots/<timestamp>``; record the git sha there."""
    dest = (camp_dir / "snapshots" / unique_stamp()).resolve()
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SNAPSHOT_DIRS:
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name, ignore=ignore)
    sha, dirty = git_state(source)
    (dest / SNAPSHOT_SHA_FILE).write_text(f"{sha or 'unknown'}{' dirty' if dirty else ''}\n")
    return dest


def read_jobs(camp_dir: Path) -> dict[str, dict]:
    """cell_id -> its latest job record."""
    path = camp_dir / JOBS_FILE
    jobs: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                jobs[rec["cell_id"]] = rec
    return jobs


def _append_jobs(camp_dir: Path, records: Iterable[dict]) -> None:
    with open(camp_dir / JOBS_FILE, "a") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")


# ------------------------------------------------------------------ submission

@dataclass
class Submission:
    arrays: int  # sbatch calls
    cells: int
    classes: int
    snapshot: Path | None


def submit_cells(cells: list[CellConfig], results_dir: Path, cluster: ClusterConfig,
                 campaign: str) -> Submission:
    """Submit ``cells`` as job arrays, one sbatch per (resource class, chunk of MaxArraySize)."""
    import submitit

    results_dir = Path(results_dir).resolve()
    camp_dir = campaign_dir(results_dir, campaign)
    camp_dir.mkdir(parents=True, exist_ok=True)
    if not cells:
        return Submission(0, 0, 0, None)
    snapshot = take_snapshot(camp_dir)
    folder = camp_dir / "submitit" / "%j"
    classes: dict[ResourceClass, list[CellConfig]] = defaultdict(list)
    for cell in cells:
        classes[resource_class(cell, cluster)].append(cell)
    limit = max_array_size(cluster)
    arrays = 0
    for cls, members in sorted(classes.items()):
        dirs = [str(prepare_cell_dir(results_dir, c)) for c in members]
        for part_cells, part_dirs in zip(chunks(members, limit), chunks(dirs, limit)):
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
            executor.update_parameters(**executor_parameters(cls, cluster, snapshot, f"aletheia-{campaign}"))
            jobs = executor.map_array(CellJob(str(snapshot), cluster.cpu_fallback), list(part_dirs))
            arrays += 1
            now = time.time()
            records = []
            for cell, job in zip(part_cells, jobs):
                array_id, _, task = job.job_id.partition("_")
                records.append({"cell_id": cell.cell_id, "job_id": job.job_id, "array_job_id": array_id,
                                "task": int(task) if task else None, "snapshot": str(snapshot),
                                "submitted_at": now, "cluster": cluster.name})
            _append_jobs(camp_dir, records)
    return Submission(arrays, len(cells), len(classes), snapshot)


# ------------------------------------------------------------------ accounting and status

def _expand_tasks(spec: str) -> list[int]:
    """'[3-5,7%2]' or '4' -> task indices."""
    spec = spec.strip("[]").split("%")[0]
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


SACCT_CALLS = 0


def sacct_states(array_ids: Iterable[str]) -> dict[str, str]:
    """ONE sacct call for all ``array_ids``: job id ('A_T' or 'A') -> state (e.g. 'CANCELLED')."""
    global SACCT_CALLS
    ids = sorted(set(array_ids), key=lambda s: (len(s), s))
    if not ids:
        return {}
    SACCT_CALLS += 1
    proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"sacct failed: {proc.stderr.strip()}")
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        state = state.split()[0] if state.strip() else "UNKNOWN"
        base, sep, task = jid.partition("_")
        if sep and task.startswith("["):
            for t in _expand_tasks(task):
                states[f"{base}_{t}"] = state
        else:
            states[jid] = state
    return states


def _log_tail(work: Path, lines: int = 5) -> str:
    logs = sorted((work / LOG_DIR).glob("slurm-*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return ""
    text = logs[-1].read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


def cell_states(cells: list[CellConfig], results_dir: Path, cluster: str | None = None) -> list[dict]:
    """State of every cell from its files plus one sacct call for the whole campaign. Job records of
    another cluster than ``cluster`` (a results directory moved between clusters) are not asked
    about: their ids mean nothing, or another job, here."""
    results_dir = Path(results_dir)
    jobs: dict[str, dict] = {}
    for name in {c.campaign for c in cells}:
        jobs.update(read_jobs(campaign_dir(results_dir, name)))
    jobs = {c.cell_id: jobs[c.cell_id] for c in cells if c.cell_id in jobs}
    foreign = {cid for cid, r in jobs.items() if cluster and r.get("cluster", cluster) != cluster}
    sacct = sacct_states(r["array_job_id"] for cid, r in jobs.items() if cid not in foreign)
    now = time.time()
    out = []
    for cell in cells:
        rs = row_state(results_dir, cell)
        rec = jobs.get(cell.cell_id)
        if cell.cell_id in foreign:
            if rs.row is None:
                out.append(_state(cell, "missing", f"job {rec['job_id']} ran on cluster {rec['cluster']}, not "
                                                    f"{cluster}; resubmit runs the cell here"))
                continue
            rec = None  # its row speaks for it
        sched = (sacct.get(rec["job_id"]) or sacct.get(rec["array_job_id"])) if rec else None
        work = cell_path(results_dir, cell)
        lost = rec is not None and sched is None and now - rec["submitted_at"] > ACCOUNTING_GRACE_S
        if rs.row is not None and rs.row["status"] == "ok":
            state, reason = "done", None
        elif rec and not lost and (sched is None or sched in ACTIVE):
            state = ACTIVE.get(sched or "PENDING", "pending")
            reason = f"job {rec['job_id']} {sched or 'submitted (not yet in accounting)'}"
        elif lost and rs.row is None:
            state = "missing"
            reason = (f"job {rec['job_id']} is unknown to this cluster's accounting "
                      f"{(now - rec['submitted_at']) / 60:.0f} min after submission; resubmit runs the cell again")
        elif rs.row is not None:
            state, reason = "failed", rs.row["failure_reason"]
            if rs.row["status"] == "failed":
                tail = _log_tail(work)
                reason = f"{reason.splitlines()[0]}" + (f"\n{tail}" if tail else "")
        elif rec:
            state = "failed"
            if sched == "FAILED":
                tail = _log_tail(work)
                reason = f"FAILED: job {rec['job_id']}" + (f"\n{tail}" if tail else "")
            elif sched == "COMPLETED":
                reason = f"COMPLETED without a row: job {rec['job_id']}"
            else:
                reason = f"{sched}: job {rec['job_id']}"
        else:
            state, reason = "missing", rs.problem
        out.append(_state(cell, state, reason))
    return out


def _state(cell: CellConfig, state: str, reason: str | None) -> dict:
    return {"cell_id": cell.cell_id, "model": cell.model.name, "recipe": cell.recipe.name,
            "variant": cell.variant, "seed": cell.seed, "state": state, "reason": reason}


def cancel(cells: list[CellConfig], results_dir: Path, cluster: str | None = None) -> list[str]:
    """scancel the campaign's queued and running jobs on ``cluster``, in one call; returns the ids."""
    states = cell_states(cells, results_dir, cluster)
    jobs: dict[str, dict] = {}
    for name in {c.campaign for c in cells}:
        jobs.update(read_jobs(campaign_dir(Path(results_dir), name)))
    ids = sorted({jobs[s["cell_id"]]["job_id"] for s in states
                  if s["state"] in ("pending", "running") and s["cell_id"] in jobs})
    if ids:
        # a job that ended since the status query is no error: scancel still cancels the others
        proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            raise RuntimeError(f"scancel failed: {proc.stderr.strip()}")
    return ids
