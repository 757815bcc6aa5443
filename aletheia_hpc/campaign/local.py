"""Run a campaign's cells on this machine, no scheduler: each cell in its own worker process,
``local_workers`` at a time, output copied to the terminal and to the cell's attempt log."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from aletheia_hpc.campaign.store import LOG_DIR, REQUEUE_EXIT_CODE, prepare_cell_dir, worker_command
from aletheia_hpc.config import CellConfig, ClusterConfig

_print_lock = threading.Lock()


def visible_gpus() -> int:
    """NVIDIA GPUs a cell started here would see: ``nvidia-smi -L``, narrowed by CUDA_VISIBLE_DEVICES
    (whose list ends at its first negative entry, as CUDA reads it). 0 without a driver."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    found = sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return found
    allowed = 0
    for entry in mask.split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        allowed += 1
    return min(found, allowed)


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
             cpu_fallback: bool) -> int:
    work_dir = prepare_cell_dir(results_dir, cell)
    while True:
        log_path = work_dir / LOG_DIR / f"local-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns()}.log"
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
    """Run ``cells``; returns cell_id -> worker exit code. A failed cell never stops the others."""
    if not cells:
        return {}
    echo = workers == 1  # interleaved progress bars from parallel cells would be unreadable
    # Share the cores: parallel cells that each spawn one thread per core slow each other down
    # many times over (a user's own OMP_NUM_THREADS wins).
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    codes: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run_one, cell, results_dir, f"[{i + 1}/{len(cells)}]", echo, env,
                               cpu_fallback): cell
                   for i, cell in enumerate(cells)}
        for future, cell in futures.items():
            codes[cell.cell_id] = future.result()
            if codes[cell.cell_id] != 0:
                _say(f"cell {cell.cell_id} ({cell.model.name}/{cell.recipe.name}/seed {cell.seed}) "
                     f"exited with code {codes[cell.cell_id]}; logs under {Path(results_dir) / cell.campaign / 'cells' / cell.cell_id / LOG_DIR}")
    return codes
