"""The local dispatcher: a campaign's cells on this machine, no scheduler. Each cell runs in its own
worker process (in the launch's code snapshot), ``local_workers`` at a time, its output copied to
the terminal and to the cell's attempt log. The launch holds each part's ``launch.lock`` while it
runs (campaign.service); job records name the launch, so status can tell its cells apart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from aletheia_hpc.campaign.dispatch import SchedulerView, Submission
from aletheia_hpc.campaign.preflight import job_environment
from aletheia_hpc.campaign.store import (LOG_DIR, REQUEUE_EXIT_CODE, append_job, launch_lock_path,
                                         prepare_cell_dir, unique_stamp, worker_command)
from aletheia_hpc.config import CellConfig, ClusterConfig, ConfigError
from aletheia_hpc.files import lock_holder
from aletheia_hpc.provenance import host_name

_print_lock = threading.Lock()


def visible_gpu_ids() -> list[str]:
    """The NVIDIA GPUs a cell started here would see, as CUDA_VISIBLE_DEVICES entries: ``nvidia-smi -L``,
    narrowed by CUDA_VISIBLE_DEVICES (whose list ends at its first negative entry, as CUDA reads it).
    Empty without a driver."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return [str(i) for i in range(found)]
    allowed = []
    for entry in (e.strip() for e in mask.split(",")):
        if not entry or entry.startswith("-"):
            break
        allowed.append(entry)
    return allowed[:found]


def visible_gpus() -> int:
    return len(visible_gpu_ids())


class GpuPool:
    """This machine's GPUs, handed out to the cells that run at the same time so that no two share one
    (their step times are the study's measurement)."""

    def __init__(self, devices: list[str]):
        self._free = list(devices)
        self._total = len(devices)
        self._changed = threading.Condition()

    def acquire(self, n: int) -> list[str]:
        """``n`` devices, waiting until they are free; none when the machine has fewer than ``n`` (the
        worker then refuses the cell, or trains it on the CPU under cluster.cpu_fallback)."""
        if n == 0 or n > self._total:
            return []
        with self._changed:
            self._changed.wait_for(lambda: len(self._free) >= n)
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    def release(self, devices: list[str]) -> None:
        with self._changed:
            self._free.extend(devices)
            self._changed.notify_all()


def with_local_gpus(cluster: ClusterConfig) -> ClusterConfig:
    """The cluster with a GPU count to check cells against: a local cluster's ``gpus_per_node: -1``
    becomes this machine's visible GPUs."""
    if cluster.kind == "local" and cluster.gpus_per_node < 0:
        return replace(cluster, gpus_per_node=visible_gpus())
    return cluster


def _say(text: str) -> None:
    with _print_lock:
        print(text, file=sys.stderr, flush=True)


class LocalDispatcher:
    """Runs cells at once, in this process's launch; its view of jobs is the launch locks."""
    kind = "local"

    def __init__(self, cluster: ClusterConfig, results_dir: Path):
        self.cluster, self.results_dir = cluster, Path(results_dir)
        self.launch_id = f"{host_name()}:{os.getpid()}:{unique_stamp()}"
        self._running: set[subprocess.Popen] = set()
        self._stopped_by: str | None = None  # the signal that stopped this launch

    def observe(self, jobs: dict[str, dict]) -> SchedulerView:
        """A recorded local job is queued or running while the launch that recorded it still holds
        its part's lock; otherwise it has ended."""
        live: dict[str, str | None] = {}
        states = {}
        for rec in jobs.values():
            part = rec.get("part", "")
            if part not in live:
                holder = lock_holder(launch_lock_path(self.results_dir, part))
                live[part] = json.loads(holder).get("launch") if holder else None
            if rec.get("launch") == live[part] and rec.get("phase") != "ended":
                states[rec["job_id"]] = "RUNNING" if rec.get("phase") == "running" else "PENDING"
        return SchedulerView("local", states)

    def submit(self, cells: list[CellConfig], results_dir: Path, snapshots: dict[str, Path]) -> Submission:
        """Run ``cells`` to the end; a failed cell never stops the others. A cell that asks for GPUs
        gets its own (CUDA_VISIBLE_DEVICES), and waits while they are in use."""
        workers = self.cluster.local_workers
        self._progress = {"total": len(cells), "finished": 0, "started": time.monotonic()}
        for cell in cells:
            prepare_cell_dir(results_dir, cell)
            self._record(cell, "queued", snapshots[cell.campaign])
        echo = workers == 1  # interleaved progress bars from parallel cells would be unreadable
        # Share the cores: parallel cells that each spawn one thread per core slow each other down
        # many times over (a user's own OMP_NUM_THREADS wins).
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        env.update(job_environment(self.cluster))  # the profile's HF_HOME and, compute_offline, no hub
        gpus = GpuPool(visible_gpu_ids() if any(c.model.resources.gpus for c in cells) else [])
        codes: dict[str, int] = {}
        with self._stop_on_signals(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(self._run_one, cell, Path(results_dir), f"[{i + 1}/{len(cells)}]", echo, env,
                                   gpus, snapshots[cell.campaign]): cell
                       for i, cell in enumerate(cells)}
            for future, cell in futures.items():
                code = future.result()
                if code is None:  # never started: the launch was stopped
                    continue
                codes[cell.cell_id] = code
                if code != 0 and not self._stopped_by:
                    _say(f"cell {cell.cell_id} ({cell.model.name}/{cell.recipe.name}/seed {cell.seed}) "
                         f"exited with code {code}; logs: aletheia-hpc logs {cell.cell_id}")
        return Submission(cells=len(cells), exit_codes=codes, stopped_by=self._stopped_by)

    @contextmanager
    def _stop_on_signals(self):
        """SIGTERM or SIGHUP (a killed launch, a closed terminal, the end of the batch job it runs in):
        the running workers are asked to checkpoint and stop, as SLURM asks them, and queued cells do
        not start; the next launch resumes them. Unhandled, the workers would train on, orphaned."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
        for sig in previous:
            signal.signal(sig, self._stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, signum, _frame) -> None:
        self._stopped_by = signal.Signals(signum).name
        for proc in list(self._running):
            proc.send_signal(signal.SIGTERM)  # a no-op for a worker already reaped

    def cancel(self, job_ids: list[str]) -> list[str]:
        raise ConfigError("cancel needs a SLURM cluster: stop a local launch with Ctrl-C "
                          "(its finished cells keep their rows)")

    def _record(self, cell: CellConfig, phase: str, snapshot: Path, **extra) -> None:
        # one job id per cell: observe keys its states by job id, and each cell of a launch has its own
        append_job(self.results_dir, cell, {"job_id": f"local-{self.launch_id}-{cell.cell_id}", "launch": self.launch_id,
                                            "part": cell.campaign, "phase": phase, "snapshot": str(snapshot),
                                            "submitted_at": time.time(), "cluster": self.cluster.name,
                                            **extra})

    def _say_finished(self, cell: CellConfig, label: str, code: int) -> None:
        """One line per finished cell, with the launch's ETA from the mean time per cell so far."""
        with _print_lock:
            progress = self._progress
            progress["finished"] += 1
            done, total = progress["finished"], progress["total"]
            elapsed = time.monotonic() - progress["started"]
            eta = elapsed / done * (total - done)
            print(f"{label} finished ({'ok' if code == 0 else f'exit {code}'}): {cell.model.name} / "
                  f"{cell.recipe.name} / seed {cell.seed}; {done} of {total} cells done in {elapsed / 60:.1f} min, "
                  f"ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def _run_one(self, cell: CellConfig, results_dir: Path, label: str, echo: bool, env: dict[str, str],
                 gpus: GpuPool, snapshot: Path) -> int | None:
        """The cell's worker exit code; None when the launch was stopped before the cell started."""
        devices = gpus.acquire(cell.model.resources.gpus)
        try:
            if self._stopped_by:
                return None
            self._record(cell, "running", snapshot)
            env = {**env, "PYTHONPATH": str(snapshot) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")}
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            code = self._run_until_done(cell, results_dir, label, echo, env, snapshot)
            self._say_finished(cell, label, code)
            self._record(cell, "ended", snapshot, exit_code=code)
            return code
        finally:
            gpus.release(devices)

    def _run_until_done(self, cell: CellConfig, results_dir: Path, label: str, echo: bool,
                        env: dict[str, str], snapshot: Path) -> int:
        work_dir = prepare_cell_dir(results_dir, cell)
        while True:
            log_path = work_dir / LOG_DIR / f"local-{unique_stamp()}.log"
            _say(f"{label} {cell.model.name} / {cell.recipe.name} / seed {cell.seed} / {cell.variant} "
                 f"-> {work_dir}")
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(worker_command(work_dir, progress=True, cpu_fallback=self.cluster.cpu_fallback),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=snapshot)
                self._running.add(proc)
                if self._stopped_by:  # the signal came while it started
                    proc.send_signal(signal.SIGTERM)
                # Raw chunks, not lines: progress bars redraw with carriage returns.
                while chunk := proc.stdout.read1(4096):
                    log.write(chunk)
                    log.flush()  # for `logs --follow` while the cell runs
                    if echo:
                        with _print_lock:
                            sys.stderr.buffer.write(chunk)
                            sys.stderr.flush()
                code = proc.wait()
                self._running.discard(proc)
            if code != REQUEUE_EXIT_CODE or self._stopped_by:
                return code
