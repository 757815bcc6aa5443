"""``aletheia-hpc VERB [hydra overrides] [--flags]``: the one entry point.

Verbs: plan, launch, status, resubmit, cancel, run-cell, aggregate. Overrides use Hydra syntax
(``campaign=smoke model=tiny-qwen2 train.steps=10``); flags start with ``--``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from aletheia_hpc.config import ConfigError

VERBS = ("plan", "launch", "status", "resubmit", "cancel", "run-cell", "aggregate")


def _plan(overrides):
    from aletheia_hpc.campaign.matrix import expand

    return expand(overrides)


def _cell_label(cell) -> str:
    from aletheia_hpc.campaign.matrix import cell_label

    return cell_label(cell)


def _require_placement(cells, cluster) -> None:
    """Refuse, before anything runs, every cell whose GPUs, CPUs or memory the cluster can never give
    (a local cluster counts this machine's GPUs)."""
    from aletheia_hpc.campaign.local import with_local_gpus
    from aletheia_hpc.campaign.matrix import placement_problem

    cluster = with_local_gpus(cluster)
    problems = [f"cell {c.cell_id} ({_cell_label(c)}) {problem}" for c in cells
                if (problem := placement_problem(c, cluster))]
    if problems:
        raise ConfigError(f"{len(problems)} cell(s) cannot run as asked on cluster {cluster.name}:\n  "
                          + "\n  ".join(problems))


def _memory_lines(plan) -> tuple[dict[str, str], list[str]]:
    """Per cell its estimated peak memory, and a warning for each cell that will not fit its GPUs."""
    from aletheia_hpc.campaign.memory import estimate_cell, fit_problem

    estimates, warnings = {}, []
    for cell in plan.cells:
        est = estimate_cell(cell)
        estimates[cell.cell_id] = (f"~{est.per_gpu_gib:5.1f} GiB{'/GPU' if cell.model.resources.gpus else ' CPU'}"
                                   f"{' (rough)' if est.rough else ''}") if est else "memory ?"
        problem = fit_problem(cell, est, plan.root.cluster)
        if problem:
            warnings.append(f"warning: cell {cell.cell_id} ({_cell_label(cell)}) will not fit: {problem}")
    return estimates, warnings


def cmd_plan(overrides, args) -> int:
    from aletheia_hpc.campaign.slurm import resource_class

    plan = _plan(overrides)
    if args.json:
        print(json.dumps(plan_json(plan), indent=1))
        _require_placement(plan.cells, plan.root.cluster)  # stderr and exit 2, after the plan
        return 0
    classes = Counter(resource_class(c, plan.root.cluster) for c in plan.cells)
    print(f"campaign {plan.name}: {len(plan.cells)} cells on cluster {plan.root.cluster.name} "
          f"({plan.root.cluster.kind}), results in {plan.root.results_dir}")
    for cls, n in sorted(classes.items()):  # as submitted: time clamped to the cluster's limit
        print(f"  resource class gpus={cls.gpus} cpus={cls.cpus} mem={cls.mem_gb}G time={cls.time_min}min"
              + (f" partition={cls.partition}" if cls.partition else "") + f": {n} cells")
    estimates, warnings = _memory_lines(plan)
    for cell in plan.cells:
        print(f"    {cell.cell_id}  {cell.campaign:10s} {cell.model.name:22s} {cell.arm:24s} "
              f"seed={cell.seed:<4d} steps={cell.train.steps}  {estimates[cell.cell_id]}")
    for line in warnings:
        print(line, file=sys.stderr)
    print("nothing submitted (plan only)" + (f"; {len(warnings)} cell(s) will not fit their GPUs"
                                             if warnings else ""))
    _require_placement(plan.cells, plan.root.cluster)  # after the table: the plan is still worth reading
    return 0


def plan_json(plan) -> dict:
    """The plan as data: the campaign and, per cell, what it is and what it asks for."""
    from dataclasses import asdict

    return {"campaign": plan.name, "cluster": plan.root.cluster.name, "results_dir": str(plan.root.results_dir),
            "n_cells": len(plan.cells),
            "cells": [{"cell_id": c.cell_id, "campaign": c.campaign, "model": c.model.name,
                       "recipe": c.recipe.name, "arm": c.arm, "variant": c.variant, "seed": c.seed,
                       "steps": c.train.steps, "resources": asdict(c.model.resources)} for c in plan.cells]}


def _states(plan) -> list[dict]:
    from aletheia_hpc.campaign.slurm import cell_states

    return cell_states(plan.cells, Path(plan.root.results_dir), plan.root.cluster.name)


def _submit(plan, cells) -> int:
    from aletheia_hpc.campaign.slurm import submit_cells

    sub = submit_cells(cells, Path(plan.root.results_dir), plan.root.cluster, plan.name)
    print(f"submitted {sub.cells} cells as {sub.arrays} job array(s) in {sub.classes} resource class(es)"
          + (f"; code snapshot {sub.snapshot}" if sub.snapshot else ""), file=sys.stderr)
    return 0


def _set_old_rows_aside(results_dir: Path, cells) -> None:
    """Keep the row of every cell about to run again as row.json.replaced-*, so that its status
    never mixes the old row with the new attempt."""
    from aletheia_hpc.campaign.store import move_row_aside

    for cell in cells:
        moved = move_row_aside(results_dir, cell)
        if moved:
            print(f"cell {cell.cell_id}: old row kept as {moved}", file=sys.stderr)


def cmd_launch(overrides, args) -> int:
    """Run (local) or submit (SLURM) every cell that is not done and not queued: cells without a row,
    and failed or nan_abort cells, whose old row is kept aside."""
    from aletheia_hpc.campaign.store import is_done

    plan = _plan(overrides)
    results_dir = Path(plan.root.results_dir)
    _require_placement(plan.cells, plan.root.cluster)
    for line in _memory_lines(plan)[1]:  # a warning, not a refusal: the estimate is approximate
        print(line, file=sys.stderr)
    if plan.root.cluster.kind == "slurm":
        states = {s["cell_id"]: s["state"] for s in _states(plan)}
        todo = [c for c in plan.cells if states[c.cell_id] not in ("done", "pending", "running")]
        print(f"campaign {plan.name}: {len(plan.cells)} cells, "
              f"{sum(v == 'done' for v in states.values())} already done, "
              f"{sum(v in ('pending', 'running') for v in states.values())} queued or running, "
              f"{len(todo)} to submit to {plan.root.cluster.name}", file=sys.stderr)
        _set_old_rows_aside(results_dir, todo)
        return _submit(plan, todo)
    if plan.root.cluster.kind != "local":
        raise ConfigError(f"cluster.kind={plan.root.cluster.kind!r}: use local or slurm")
    from aletheia_hpc.campaign.local import run_local

    todo = [c for c in plan.cells if not is_done(results_dir, c)]
    print(f"campaign {plan.name}: {len(plan.cells)} cells, {len(plan.cells) - len(todo)} already done, "
          f"{len(todo)} to run on {plan.root.cluster.name}", file=sys.stderr)
    _set_old_rows_aside(results_dir, todo)
    codes = run_local(todo, results_dir, plan.root.cluster.local_workers, plan.root.cluster.cpu_fallback)
    failed = [cid for cid, code in codes.items() if code != 0]
    _print_status(plan, as_json=False)
    return 1 if failed else 0


def _print_status(plan, as_json: bool) -> None:
    cells = _states(plan)
    counts = dict(Counter(c["state"] for c in cells))
    if as_json:
        print(json.dumps({"counts": counts, "cells": cells}, indent=1))
        return
    for c in cells:
        reason = (c["reason"] or "").replace("\n", "\n" + " " * 8)
        print(f"{c['cell_id']}  {c['model']:22s} {c['recipe']:9s} seed={c['seed']:<4d} {c['variant']:16s} "
              f"{c['state']:8s} {reason}")
    print("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


def cmd_status(overrides, args) -> int:
    _print_status(_plan(overrides), as_json=args.json)
    return 0


def _require_slurm(plan, verb: str) -> None:
    if plan.root.cluster.kind != "slurm":
        raise ConfigError(f"{verb} needs a SLURM cluster (cluster=<name> of kind slurm); "
                          f"cluster {plan.root.cluster.name!r} is {plan.root.cluster.kind}")


def cmd_resubmit(overrides, args) -> int:
    """Submit the failed and missing cells (none that is queued or running); --force reruns named cells."""
    from aletheia_hpc.campaign.store import move_progress_aside

    plan = _plan(overrides)
    _require_slurm(plan, "resubmit")
    results_dir = Path(plan.root.results_dir)
    states = {s["cell_id"]: s for s in _states(plan)}
    by_id = {c.cell_id: c for c in plan.cells}
    force = list(dict.fromkeys(args.force or []))
    unknown = [cid for cid in force if cid not in by_id]
    if unknown:
        raise ConfigError(f"--force: no such cell in campaign {plan.name}: {', '.join(unknown)}")
    busy = [cid for cid in force if states[cid]["state"] in ("pending", "running")]
    if busy:
        raise ConfigError(f"--force: cells queued or running (cancel them first): {', '.join(busy)}")
    todo = [c for c in plan.cells if c.cell_id in force or states[c.cell_id]["state"] in ("failed", "missing")]
    _require_placement(todo, plan.root.cluster)
    for cell in todo:
        if cell.cell_id in force:
            move_progress_aside(results_dir, cell)  # a forced rerun starts from scratch
    _set_old_rows_aside(results_dir, todo)
    print(f"campaign {plan.name}: resubmitting {len(todo)} cell(s)", file=sys.stderr)
    return _submit(plan, todo)


def cmd_cancel(overrides, args) -> int:
    from aletheia_hpc.campaign.slurm import cancel

    plan = _plan(overrides)
    _require_slurm(plan, "cancel")
    ids = cancel(plan.cells, Path(plan.root.results_dir), plan.root.cluster.name)
    print(f"cancelled {len(ids)} job(s)" + (f": {' '.join(ids)}" if ids else ""), file=sys.stderr)
    return 0


def cmd_run_cell(overrides, args) -> int:
    from aletheia_hpc.campaign.matrix import check_cells, compose_root
    from aletheia_hpc.config import CellConfig
    from aletheia_hpc.worker.cell import run_cell

    root = compose_root(overrides)
    cell = CellConfig(campaign=root.campaign.name, model=root.model, recipe=root.recipe, train=root.train,
                      data=root.data, eval=root.eval, seed=root.seed, variant=root.variant)
    check_cells([cell])
    _require_placement([cell], root.cluster)
    row = run_cell(cell, Path(root.results_dir), progress=root.progress, cpu_fallback=root.cluster.cpu_fallback)
    # one line, last: scripts read it with `tail -1`
    print(json.dumps({k: row[k] for k in ("cell_id", "status", "selected_layers", "train_time_s",
                                           "eval_loss")}))
    return 0 if row["status"] == "ok" else 1


def cmd_aggregate(overrides, args) -> int:
    from aletheia_hpc.aggregate import aggregate_campaign, summary_table

    plan = _plan(overrides)
    names = plan.root.campaign.parts or [plan.name]
    for name in names:
        expected = sum(1 for c in plan.cells if c.campaign == name)
        result = aggregate_campaign(Path(plan.root.results_dir), name, expected_cells=expected)
        print(summary_table(result))
        print(f"report: {result.report_md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aletheia-hpc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("verb", choices=VERBS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. campaign=smoke train.steps=5")
    parser.add_argument("--json", action="store_true", help="plan, status: machine-readable output")
    parser.add_argument("--force", nargs="+", metavar="CELL_ID",
                        help="resubmit: rerun these cells even if done (their old row is kept aside)")
    args = parser.parse_args(argv)
    handler = {"plan": cmd_plan, "launch": cmd_launch, "status": cmd_status, "resubmit": cmd_resubmit,
               "cancel": cmd_cancel, "run-cell": cmd_run_cell, "aggregate": cmd_aggregate}[args.verb]
    try:
        return handler(args.overrides, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
