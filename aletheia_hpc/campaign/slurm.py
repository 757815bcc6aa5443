"""The SLURM dispatcher: job arrays per (campaign part, resource class), one sacct per status (and
the controller's queue for the jobs accounting has not caught up with), requeue on USR2.

Orchestration only: nothing here imports torch or the worker. Under ``<results_dir>/<part>/``:

``cells/<cell_id>/``  the cell's files (store.py), its job records (``jobs.jsonl``: job_id ``A_T``,
                      array_job_id, task, snapshot, submitted_at, cluster) and the worker's output
                      of each attempt (``logs/slurm-<job>-r<restart>.log``).
``snapshots/<ts>/``   the code a launch runs (store.take_snapshot); jobs run with PYTHONPATH and
                      cwd there, so editing the checkout never changes a running or requeued job.
``submitit/``         submitit's pickles and the per-task scheduler logs.

Requeue: the job function runs ``python -m aletheia_hpc.worker CELL_DIR`` as a child process
and forwards SIGUSR2 (SLURM's ``--signal=USR2@signal_delay_s`` pre-timeout warning) and SIGTERM to
it. The worker checkpoints and exits with REQUEUE_EXIT_CODE; if the warning was USR2 the job
function then runs ``scontrol requeue`` on its own job, and the next attempt resumes from the
checkpoint in the cell directory. A SIGTERM alone (scancel) is not requeued. Any other non-zero
exit (an exception, a nan_abort) fails the job, so SLURM records FAILED.
"""

from __future__ import annotations

import getpass
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from aletheia_hpc.campaign.dispatch import SchedulerView, Submission
from aletheia_hpc.campaign.preflight import hub_setup_lines
from aletheia_hpc.campaign.state import ACTIVE, REQUEUED_BY_SLURM
from aletheia_hpc.campaign.store import (LOG_DIR, REQUEUE_EXIT_CODE, append_job, campaign_dir,
                                         prepare_cell_dir, worker_command)
from aletheia_hpc.config import CellConfig, ClusterConfig, sbatch_extra_parameters

MAX_REQUEUES = 20  # a cell that asks for more is failed (its time limit is far too short)
SCHEDULER_TIMEOUT_S = 30  # an accounting or controller query that takes longer counts as down


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
        "setup": [*cluster.setup, *hub_setup_lines(cluster), f"export PYTHONPATH={shlex.quote(str(snapshot))}",
                  f"cd {shlex.quote(str(snapshot))}"],
        "additional_parameters": {"requeue": True, **sbatch_extra_parameters(cluster.sbatch)},
    }
    sb = cluster.sbatch
    if cls.gpus:
        params["gres"] = f"gpu:{sb.gres_type}:{cls.gpus}" if sb.gres_type else f"gpu:{cls.gpus}"
    if sb.constraint:
        params["constraint"] = sb.constraint
    if sb.exclusive:
        params["exclusive"] = True
    if sb.reservation:
        params["additional_parameters"]["reservation"] = sb.reservation
    if sb.mail_type:
        params["mail_type"], params["mail_user"] = sb.mail_type, sb.mail_user
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



# ------------------------------------------------------------------ the dispatcher

class SchedulerDown(RuntimeError):
    """An accounting or controller query that failed or did not answer in time."""


def _query(args: list[str], what: str) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=SCHEDULER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SchedulerDown(f"{what} did not answer within {SCHEDULER_TIMEOUT_S} s") from None
    except OSError as exc:
        raise SchedulerDown(f"{what}: {exc}") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise SchedulerDown(f"{what} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


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


def _job_lines(out: str) -> dict[str, str]:
    """'JOBID|STATE' lines (array ranges expanded) -> job id -> state."""
    states: dict[str, str] = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|")[:2]
        state = state.split()[0] if state.strip() else "UNKNOWN"
        base, sep, task = jid.partition("_")
        if sep and task.startswith("["):
            for t in _expand_tasks(task):
                states[f"{base}_{t}"] = state
        else:
            states[jid] = state
    return states


def _mebibytes(value: str) -> float | None:
    """sacct's MaxRSS ('123456K', '1.5G', '0') in MiB."""
    value = value.strip()
    if not value:
        return None
    scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 ** 2}
    if value[-1] in scale:
        return float(value[:-1]) * scale[value[-1]]
    return float(value) / 2 ** 20  # bytes


def _tres(value: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in value.split(",") if "=" in item)


SACCT_FIELDS = "JobID,State,ElapsedRaw,AllocTRES,MaxRSS,NodeList"


def parse_sacct(out: str) -> tuple[dict[str, str], dict[str, dict]]:
    """``sacct -n -P -D -o SACCT_FIELDS`` output -> (job id -> state, job id -> usage of a job that
    started: elapsed_s summed over its runs (requeues), alloc_cpus, alloc_gpus, max_rss_mib over its
    steps)."""
    states = _job_lines(out)
    usage: dict[str, dict] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 5 or "[" in parts[0]:
            continue
        jid, _state, elapsed, tres, rss = parts[:5]
        job, _, step = jid.partition(".")
        rec = usage.setdefault(job, {"elapsed_s": 0, "alloc_cpus": 0, "alloc_gpus": 0, "max_rss_mib": None})
        if not step:  # the allocation: one line per run of the job
            alloc = _tres(tres)
            rec["elapsed_s"] += int(elapsed or 0)
            rec["alloc_cpus"] = int(alloc.get("cpu", rec["alloc_cpus"]))
            rec["alloc_gpus"] = int(alloc.get("gres/gpu", rec["alloc_gpus"]))
        elif (mib := _mebibytes(rss)) is not None:
            rec["max_rss_mib"] = max(rec["max_rss_mib"] or 0.0, mib)
    return states, {jid: rec for jid, rec in usage.items() if rec["elapsed_s"] > 0}


def job_runs(out: str) -> dict[str, list[str]]:
    """``sacct -n -P -D -o SACCT_FIELDS`` output -> job id -> each of its runs, oldest first, as the run
    ended or stands (``"NODE_FAIL on node1"``, ``"PENDING"``): more than one for a job requeued after a
    node failure, a preemption or a timeout warning."""
    runs: dict[str, list[str]] = defaultdict(list)
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 6 or "." in parts[0] or "[" in parts[0]:
            continue
        state = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"
        runs[parts[0]].append(f"{state} on {parts[5]}" if parts[5] and parts[5] != "None assigned" else state)
    return dict(runs)


def earlier_runs(runs: dict[str, list[str]], requeued: Iterable[str] = ()) -> dict[str, list[str]]:
    """How each run before a job's current one ended (job_runs), for the jobs that ran more than once.
    ``requeued``: jobs the controller has queued again after the run accounting calls their latest
    (it has not recorded the new run yet), so that run is an earlier one too."""
    requeued = set(requeued)
    earlier = {jid: ended if jid in requeued else ended[:-1] for jid, ended in runs.items()}
    return {jid: ended for jid, ended in earlier.items() if ended}


def sacct_states(array_ids: Iterable[str]) -> tuple[dict[str, str], dict[str, dict], dict[str, list[str]]]:
    """ONE sacct call for all ``array_ids``: states and usage (parse_sacct) of every job and task,
    and the runs of each (job_runs)."""
    ids = sorted(set(array_ids), key=lambda s: (len(s), s))
    if not ids:
        return {}, {}, {}
    out = _query(["sacct", "-n", "-P", "-D", "-j", ",".join(ids), "-o", SACCT_FIELDS], "accounting (sacct)")
    return (*parse_sacct(out), job_runs(out))


def squeue_states() -> dict[str, str]:
    """The controller's queue (this user's jobs, one line per array task): job id -> state."""
    return _job_lines(_query(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"],
                             "the controller (squeue)"))


def fill_from_queue(accounting: dict[str, str], job_ids: Iterable[str],
                    queue: Callable[[], dict[str, str]]) -> dict[str, str]:
    """Accounting's states, with the controller's word for the jobs still in its queue that
    accounting does not know yet or still calls queued or running. slurmdbd records a job's start
    after the controller does (seconds on a quiet cluster, minutes when the database is slow), so a
    running job can be unknown to sacct or PENDING there, and a job SLURM requeued after a node
    failure or a preemption can still be NODE_FAIL or PREEMPTED there. A job that accounting calls
    active and the queue no longer lists has just ended: accounting's (busy) word stands until it
    records the end. ``queue`` (squeue_states) is asked only when some job may lag, i.e. not once
    all have ended for good."""
    lagging = [jid for jid in job_ids
               if jid not in accounting or accounting[jid] in ACTIVE or accounting[jid] in REQUEUED_BY_SLURM]
    if not lagging:
        return accounting
    in_queue = queue()
    return accounting | {jid: in_queue[jid] for jid in lagging if jid in in_queue}


class SlurmDispatcher:
    kind = "slurm"

    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster

    def observe(self, jobs: dict[str, dict]) -> SchedulerView:
        if not jobs:
            return SchedulerView("sacct")
        try:
            accounted, usage, runs = sacct_states(r["array_job_id"] for r in jobs.values())
        except SchedulerDown as accounting:
            try:
                return SchedulerView("squeue", squeue_states(),
                                     f"{accounting}: states from the controller's queue and the cells' files")
            except SchedulerDown as controller:
                return SchedulerView("none", {}, f"{accounting}; {controller}: states from the cells' files only")
        try:
            states = fill_from_queue(accounted, (r["job_id"] for r in jobs.values()), squeue_states)
        except SchedulerDown:
            states = accounted  # accounting's word alone: what it lacks counts as just submitted (campaign.state)
        requeued = [jid for jid, st in accounted.items() if st in REQUEUED_BY_SLURM and states[jid] in ACTIVE]
        return SchedulerView("sacct", states, accounting=usage, earlier_runs=earlier_runs(runs, requeued))

    def submit(self, cells: list[CellConfig], results_dir: Path, snapshots: dict[str, Path]) -> Submission:
        """One sbatch per (campaign part, resource class, chunk of MaxArraySize): each part keeps its
        job name (``aletheia-<part>``), submitit folder and snapshot."""
        import submitit

        results_dir = Path(results_dir).resolve()
        groups: dict[tuple[str, ResourceClass], list[CellConfig]] = defaultdict(list)
        for cell in cells:
            groups[cell.campaign, resource_class(cell, self.cluster)].append(cell)
        limit = max_array_size(self.cluster) if cells else 0
        arrays = 0
        for (part, cls), members in sorted(groups.items()):
            snapshot = snapshots[part]
            folder = campaign_dir(results_dir, part) / "submitit" / "%j"
            for chunk in chunks(members, limit):
                dirs = [str(prepare_cell_dir(results_dir, c)) for c in chunk]
                executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
                executor.update_parameters(**executor_parameters(cls, self.cluster, snapshot, f"aletheia-{part}"))
                jobs = executor.map_array(CellJob(str(snapshot), self.cluster.cpu_fallback), dirs)
                arrays += 1
                now = time.time()
                for cell, job in zip(chunk, jobs):
                    array_id, _, task = job.job_id.partition("_")
                    append_job(results_dir, cell, {"job_id": job.job_id, "array_job_id": array_id,
                                                   "task": int(task) if task else None, "snapshot": str(snapshot),
                                                   "submitted_at": now, "cluster": self.cluster.name})
        return Submission(cells=len(cells), arrays=arrays, classes=len({cls for _, cls in groups}))

    def cancel(self, job_ids: list[str]) -> list[str]:
        if job_ids:
            # a job that ended since the status query is no error: scancel still cancels the others
            proc = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
                raise SchedulerDown(f"scancel failed: {proc.stderr.strip()}")
        return job_ids
