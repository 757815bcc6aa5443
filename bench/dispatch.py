"""Dispatch benchmark: the full ``campaign=paper`` matrix (128 cells) as no-op cells on SLURM, launched
as ONE campaign through the campaign service (as ``aletheia-hpc launch campaign=paper`` does).

    eval "$(slurm/dev-cluster env)"   # after slurm/dev-cluster up
    .venv/bin/python bench/dispatch.py [--results DIR] [--timeout S] [--plan-only] [extra hydra overrides]

Resources and precision are overridden so every cell fits the 2-CPU, GPU-less dev node.
sbatch and sacct calls are counted with PATH shims that log each call, then run the real command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aletheia_hpc.campaign import slurm as dispatch  # noqa: E402
from aletheia_hpc.campaign.matrix import expand  # noqa: E402
from aletheia_hpc.campaign.service import CampaignService  # noqa: E402
from aletheia_hpc.campaign.store import cell_path  # noqa: E402
from aletheia_hpc.row import ROW_FILENAME  # noqa: E402


def install_shims(shim_dir: Path, log: Path) -> None:
    shim_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("sbatch", "sacct"):
        real = shutil.which(tool)
        if real is None:
            sys.exit(f"{tool} not found: start the dev cluster (slurm/dev-cluster up)")
        shim = shim_dir / tool
        shim.write_text(f'#!/bin/sh\necho {tool} >> "{log}"\nexec "{real}" "$@"\n')
        shim.chmod(0o755)
    os.environ["PATH"] = f"{shim_dir}{os.pathsep}{os.environ['PATH']}"


def calls(log: Path, tool: str) -> int:
    return log.read_text().split().count(tool) if log.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", help="results dir (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for all rows")
    parser.add_argument("--plan-only", action="store_true",
                        help="expand and validate the matrix, print its size, submit nothing")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = Path(args.results or tempfile.mkdtemp(prefix="aletheia-dispatch-"))
    overrides = ["campaign=paper", "cluster=dev", "campaign.noop=true", f"results_dir={results}",
                 "model.resources.cpus=1", "model.resources.mem_gb=1", "model.resources.gpus=0",
                 "model.precision=fp32",
                 *args.overrides]
    t0 = time.perf_counter()
    plan = expand(overrides)
    t_expand = time.perf_counter() - t0
    if args.plan_only:
        print(f"cells: {len(plan.cells)}; expand (hydra compose + validation): {t_expand:.2f} s")
        return 0
    work = Path(tempfile.mkdtemp(prefix="aletheia-shims-"))
    log = work / "calls.log"
    install_shims(work / "bin", log)
    cluster = plan.root.cluster
    parts = {c.campaign for c in plan.cells}
    groups = {(c.campaign, dispatch.resource_class(c, cluster)) for c in plan.cells}
    classes = {cls for _, cls in groups}
    limit = dispatch.max_array_size(cluster)
    # the floor: one array per (part, class) and chunk of MaxArraySize (each part keeps its job name)
    arrays_needed = sum(-(-sum((c.campaign, dispatch.resource_class(c, cluster)) == g for c in plan.cells) // limit)
                        for g in groups)
    service = CampaignService(plan, say=lambda text: None)
    t1 = time.perf_counter()
    launch = service.launch()
    t_queued = time.perf_counter() - t1
    sbatch_calls = calls(log, "sbatch")

    deadline = time.monotonic() + args.timeout
    while True:
        have = sum((cell_path(results, c) / ROW_FILENAME).exists() for c in plan.cells)
        if have == len(plan.cells) or time.monotonic() > deadline:
            break
        time.sleep(1)
    t_rows = time.perf_counter() - t1

    before = calls(log, "sacct")
    status = service.status()
    sacct_calls = calls(log, "sacct") - before
    done = status.counts.get("done", 0)

    print(f"cells: {len(plan.cells)} ({len(parts)} campaign parts launched as one campaign, {len(classes)} "
          f"resource classes, MaxArraySize {limit}); submitted {launch.submission.cells}")
    print(f"sbatch calls: {sbatch_calls} (floor: {arrays_needed} = arrays needed per class and part)")
    print(f"expand (hydra compose + validation): {t_expand:.2f} s")
    print(f"launch -> all cells queued (snapshot + sbatch): {t_queued:.2f} s")
    print(f"launch -> all rows exist: {t_rows:.1f} s ({have}/{len(plan.cells)} rows)")
    print(f"sacct calls by one status: {sacct_calls}; status says done={done}")
    print(f"results: {results}")
    ok = sbatch_calls <= arrays_needed and t_queued < 5 and sacct_calls == 1 and have == len(plan.cells)
    print("floors met" if ok else "FLOORS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
