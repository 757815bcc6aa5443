"""Run a campaign's cells on this machine, no scheduler: each cell in its own worker process,
``local_workers`` at a time, output copied to the terminal and to the cell's attempt log."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from aletheia_hpc.campaign.store import LOG_DIR, REQUEUE_EXIT_CODE, prepare_cell_dir, unique_stamp, worker_command
from aletheia_hpc.config import CellConfig, ClusterConfig

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


def _run_one(cell: CellConfig, results_dir: Path, label: str, echo: bool, env: dict[str, str],
             cpu_fallback: bool, gpus: GpuPool) -> int:
    devices = gpus.acquire(cell.model.resources.gpus)
    try:
        if devices:
            env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(devices)}
        return _run_until_done(cell, results_dir, label, echo, env, cpu_fallback)
    finally:
        gpus.release(devices)


def _run_until_done(cell: CellConfig, results_dir: Path, label: str, echo: bool, env: dict[str, str],
                    cpu_fallback: bool) -> int:
    work_dir = prepare_cell_dir(results_dir, cell)
    while True:
        log_path = work_dir / LOG_DIR / f"local-{unique_stamp()}.log"
        _say(f"{label} {cell.model.name} / {cell.recipe.name} / seed {cell.seed} / {cell.variant} "
             f"-> {work_dir}")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(worker_command(work_dir, progress=True, cpu_fallback=cpu_fallback),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            # Raw chunks, not lines: progress bars redraw with carriage returns.
            while chunk := proc.stdout.read1(4096):
                log.write(chunk)
                if echo:
                    with _print_lock:
                        sys.stderr.buffer.write(chunk)
                        sys.stderr.flush()
            code = proc.wait()
        if code != REQUEUE_EXIT_CODE:
            return code


def run_local(cells: list[CellConfig], results_dir: Path, workers: int = 1,
              cpu_fallback: bool = False) -> dict[str, int]:
    """Run ``cells``; returns cell_id -> worker exit code. A failed cell never stops the others. A cell
    that asks for GPUs gets its own (CUDA_VISIBLE_DEVICES), and waits while they are in use."""
    if not cells:
        return {}
    echo = workers == 1  # interleaved progress bars from parallel cells would be unreadable
    # Share the cores: parallel cells that each spawn one thread per core slow each other down
    # many times over (a user's own OMP_NUM_THREADS wins).
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    gpus = GpuPool(visible_gpu_ids() if any(c.model.resources.gpus for c in cells) else [])
    codes: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run_one, cell, results_dir, f"[{i + 1}/{len(cells)}]", echo, env,
                               cpu_fallback, gpus): cell
                   for i, cell in enumerate(cells)}
        for future, cell in futures.items():
            codes[cell.cell_id] = future.result()
            if codes[cell.cell_id] != 0:
                _say(f"cell {cell.cell_id} ({cell.model.name}/{cell.recipe.name}/seed {cell.seed}) "
                     f"exited with code {codes[cell.cell_id]}; logs under {Path(results_dir) / cell.campaign / 'cells' / cell.cell_id / LOG_DIR}")
    return codes
