"""``aletheia-hpc VERB [hydra overrides] [--flags]``: the one entry point.

Overrides use Hydra syntax (``campaign=smoke model=tiny-qwen2 train.steps=10``); flags start with
``--`` and may stand anywhere on the line. The CLI parses and prints; the campaign service
(aletheia_hpc/campaign/service.py) decides. Verbs:
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aletheia_hpc.config import ConfigError
from aletheia_hpc.files import CellBusy, directory_problem


def _plan(overrides, write: bool = False):
    from aletheia_hpc.campaign.matrix import expand

    plan = expand(overrides)
    require_results_dir(plan.root.results_dir, write=write)
    return plan


def require_results_dir(results_dir, write: bool) -> None:
    """Refuse a results_dir that is (or lies under) a file, or, for a verb that writes, one it cannot write."""
    problem = directory_problem(Path(results_dir), write=write)
    if problem:
        raise ConfigError(f"results_dir={results_dir}: {problem}; give results_dir=<a directory you can "
                          f"{'write' if write else 'read'}>")


def _service(overrides, write: bool = False):
    from aletheia_hpc.campaign.service import CampaignService

    return CampaignService(_plan(overrides, write=write))


def _cell_label(cell) -> str:
    from aletheia_hpc.campaign.matrix import cell_label

    return cell_label(cell)


def _memory_lines(plan) -> tuple[dict[str, str], list[str]]:
    """Per cell its estimated peak memory, and a warning for each cell that will not fit its GPUs."""
    from aletheia_hpc.campaign.memory import estimate_cell, fit_problem

    estimates, warnings = {}, []
    for cell in plan.cells:
        est = estimate_cell(cell)
        estimates[cell.cell_id] = (f"~{est.per_gpu_gib:5.1f} GiB{'/GPU' if cell.model.resources.gpus else ' CPU'}"
                                   f"{' (rough)' if est.rough else ''}"
                                   f"{f' ({est.peak_phase}), experts {est.experts}' if est.experts else ''}"
                                   ) if est else "memory ?"
        problem = fit_problem(cell, est, plan.root.cluster)
        if problem:
            warnings.append(f"warning: cell {cell.cell_id} ({_cell_label(cell)}) will not fit: {problem}")
    return estimates, warnings


def cmd_plan(overrides, args) -> int:
    from aletheia_hpc.campaign.preflight import plan_warnings
    from aletheia_hpc.campaign.service import require_placement
    from aletheia_hpc.campaign.slurm import resource_class

    plan = _plan(overrides)
    if args.json:
        print(json.dumps(plan_json(plan), indent=1))
        for line in plan_warnings(plan):
            print(line, file=sys.stderr)
        require_placement(plan.cells, plan.root.cluster)  # stderr and exit 2, after the plan
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
    for line in plan_warnings(plan):  # compute_offline: inputs that are not where the jobs will read them
        print(line)
    _print_plan_stages(plan)
    if args.sbatch:
        _print_sbatch(plan)
    print("nothing submitted (plan only)" + (f"; {len(warnings)} cell(s) will not fit their GPUs"
                                             if warnings else ""))
    require_placement(plan.cells, plan.root.cluster)  # after the table: the plan is still worth reading
    return 0


def _print_plan_stages(plan) -> None:
    """A staged study: the stages decided so far (their cells are in the table above) and the rule."""
    from aletheia_hpc.campaign.stages import rule_lines

    if not plan.stages:
        return
    for stage in plan.stages:
        d = stage.decision
        print(f"stage {stage.stage}: {len(stage.cells)} cells, arms {', '.join(a['name'] for a in stage.arms)}"
              + (f"; decided: advanced {', '.join(d['advanced']) or '-'}" if d else "; not decided yet"))
    if not plan.study_complete:
        for line in rule_lines(plan.root.campaign.stages):
            print(f"  rule: {line}")


def plan_json(plan) -> dict:
    """The plan as data: the campaign and, per cell, what it is and what it asks for."""
    from dataclasses import asdict

    return {"campaign": plan.name, "cluster": plan.root.cluster.name, "results_dir": str(plan.root.results_dir),
            "n_cells": len(plan.cells),
            "stages": [{**s.to_dict(), "decision": s.decision} for s in plan.stages],
            "cells": [{"cell_id": c.cell_id, "campaign": c.campaign, "model": c.model.name,
                       "recipe": c.recipe.name, "arm": c.arm, "variant": c.variant, "seed": c.seed,
                       "steps": c.train.steps, "resources": asdict(c.model.resources)} for c in plan.cells]}


def _print_sbatch(plan) -> None:
    """The sbatch script of every (campaign part, resource class) array, as launch would submit it
    (the snapshot directory is named when launch takes it)."""
    from aletheia_hpc.campaign.slurm import resource_class, sbatch_script

    cluster = plan.root.cluster
    if cluster.kind != "slurm":
        raise ConfigError(f"plan --sbatch needs a SLURM cluster (cluster=<profile>); {cluster.name!r} is {cluster.kind}")
    groups = Counter((c.campaign, resource_class(c, cluster)) for c in plan.cells)
    results = Path(plan.root.results_dir).resolve()
    for (part, cls), n in sorted(groups.items()):
        print(f"\n# ---- {part}: {n} cell(s), gpus={cls.gpus} cpus={cls.cpus} mem={cls.mem_gb}G "
              f"time={cls.time_min}min")
        print(sbatch_script(cls, cluster, results / part / "snapshots" / "<launch time>",
                            results / part / "submitit" / "%j", n_tasks=n, job_name=f"aletheia-{part}"))


def cmd_launch(overrides, args) -> int:
    """Run (local) or submit (SLURM) every cell that is not done and not queued; see
    CampaignService.launch. A local launch exits 1 when a cell failed or stopped on nan_abort, 128 + the
    signal's number when SIGTERM or SIGHUP stopped it."""
    service = _service(overrides, write=True)
    for line in _memory_lines(service.plan)[1]:  # a warning, not a refusal: the estimate is approximate
        print(line, file=sys.stderr)
    launch = service.launch(force=args.force, retry_nan=args.retry_nan,
                            advance_with_failures=args.advance_with_failures, until_done=args.until_done)
    sub = launch.submission
    if launch.study_complete:
        _print_stages(service.status())  # ends with "study complete"
        return 0
    if launch.stage is not None:
        ran = "its cells are submitted" if service.dispatcher.kind == "slurm" else "its cells have run"
        print(f"stage {launch.stage}: {launch.held or ran}; run launch again to go on", file=sys.stderr)
    if service.dispatcher.kind == "slurm" or not launch.todo:
        print(f"submitted {sub.cells} cells as {sub.arrays} job array(s) in {sub.classes} resource class(es)"
              + (f"; code snapshot {next(iter(launch.snapshots.values()))}" if launch.snapshots else ""),
              file=sys.stderr)
        return 0
    _print_status(service.status(), as_json=False)
    if sub.stopped_by:
        import signal

        print(f"launch stopped by {sub.stopped_by}: running cells checkpointed, queued cells not started; "
              "`aletheia-hpc launch` again resumes them", file=sys.stderr)
        return 128 + signal.Signals[sub.stopped_by].value
    return 1 if launch.failed_cells else 0


def _print_status(status, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status.to_json(), indent=1))
        return
    parts = len({c["campaign"] for c in status.cells}) > 1
    for c in status.cells:
        reason = (c["reason"] or "").replace("\n", "\n" + " " * 8)
        print(f"{c['cell_id']}  " + (f"{c['campaign']:12s} " if parts else "")
              + f"{c['model']:22s} {c['recipe']:9s} seed={c['seed']:<4d} {c['variant']:16s} {c['state']:9s} {reason}")
    print("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(status.counts.items())))
    _print_stages(status)
    _print_cost(status.cost)
    if status.note:
        print(status.note)


def _print_stages(status) -> None:
    for s in status.stages:
        print(f"stage {s['stage']}: {s['cells']} cells, " + ", ".join(f"{k}={v}" for k, v in sorted(s["counts"].items()))
              + (f"; decided: advanced {', '.join(s['advanced']) or '-'}" if s["decided"] else "; not decided")
              + (f", winner {s['winner']}" if s["winner"] else ""))
    if status.stages:
        print("study complete" if status.study_complete else f"study at stage {status.stages[-1]['stage']}")


def _print_cost(cost: dict) -> None:
    if cost["per_arm"]:
        print("GPU-hours so far (scheduler accounting): "
              + ", ".join(f"{arm}={a['gpu_hours']:.3f} ({a['cells']} cells)" for arm, a in sorted(cost["per_arm"].items()))
              + "; `aggregate` gives what Aletheia saved")


def cmd_status(overrides, args) -> int:
    service = _service(overrides)
    if args.watch:
        return _watch(service, args.interval)
    _print_status(service.status(), as_json=args.json)
    return 0


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _watch_table(service, status):
    from rich.table import Table

    cells = service.progress(status)
    busy = [c for c in cells if c["state"] in ("pending", "running", "unknown")]
    steps_done, steps_all = sum(min(c["step"], c["steps"]) for c in cells), sum(c["steps"] for c in cells)
    table = Table(title=f"campaign {service.plan.name} on {service.cluster.name}: "
                        + ", ".join(f"{k}={v}" for k, v in sorted(status.counts.items())),
                  caption=(f"steps {steps_done}/{steps_all}; training time so far "
                           f"{_duration(sum(c['elapsed_s'] for c in cells))}; longest ETA of a busy cell "
                           f"{_duration(max((c['eta_s'] or 0 for c in busy), default=0))}"
                           + (f"\n{status.note}" if status.note else "")), caption_justify="left")
    for name in ("cell", "part", "model", "recipe", "seed", "variant", "state", "step", "elapsed", "ETA", "job"):
        table.add_column(name, justify="right" if name in ("seed", "step", "elapsed", "ETA") else "left")
    style = {"done": "green", "running": "cyan", "pending": "blue", "failed": "red", "nan_abort": "magenta",
             "missing": "yellow", "unknown": "yellow"}
    for c in cells:
        table.add_row(c["cell_id"], c["campaign"], c["model"], c["recipe"], str(c["seed"]), c["variant"],
                      f"[{style.get(c['state'], '')}]{c['state']}[/]", f"{c['step']}/{c['steps']}",
                      _duration(c["elapsed_s"]), _duration(c["eta_s"]), c["job_id"] or "")
    return table, not busy


def _watch(service, interval: float) -> int:
    """A live table, refreshed every ``interval`` s (one scheduler query each), until no cell is
    queued or running, or Ctrl-C."""
    import time

    from rich.console import Console
    from rich.live import Live

    console = Console()
    table, idle = _watch_table(service, service.status())
    try:
        with Live(table, console=console, auto_refresh=False) as live:
            while not idle:
                time.sleep(interval)
                table, idle = _watch_table(service, service.status())
                live.update(table, refresh=True)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_logs(overrides, args) -> int:
    """Print a cell's newest attempt log (local or SLURM); --follow keeps printing what is appended,
    also across requeued attempts, until the cell has a row (or Ctrl-C)."""
    from aletheia_hpc.campaign.matrix import compose_root
    from aletheia_hpc.campaign.store import cell_logs, find_cell_dir, log_chunks

    if len(args.cell_ids) != 1:
        raise ConfigError("logs needs one CELL_ID (`aletheia-hpc status` lists them), e.g. "
                          "aletheia-hpc logs 1a2b3c campaign=smoke")
    results_dir = compose_root(overrides).results_dir
    require_results_dir(results_dir, write=False)
    try:
        work = find_cell_dir(Path(results_dir), args.cell_ids[0])
    except ValueError as err:
        raise ConfigError(f"logs: {err}") from None
    if not cell_logs(work) and not args.follow:
        print(f"cell {work.name} has no logs yet ({work})", file=sys.stderr)
        return 0
    try:
        for chunk in log_chunks(work, follow=args.follow):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_cancel(overrides, args) -> int:
    ids = _service(overrides).cancel()
    print(f"cancelled {len(ids)} job(s)" + (f": {' '.join(ids)}" if ids else ""), file=sys.stderr)
    return 0


def cmd_run_cell(overrides, args) -> int:
    from aletheia_hpc.campaign.matrix import check_cells, compose_root
    from aletheia_hpc.campaign.service import require_placement
    from aletheia_hpc.config import CellConfig
    from aletheia_hpc.worker.cell import run_cell

    root = compose_root(overrides)
    cell = CellConfig(campaign=root.campaign.name, model=root.model, recipe=root.recipe, train=root.train,
                      data=root.data, eval=root.eval, seed=root.seed, variant=root.variant)
    check_cells([cell])
    require_placement([cell], root.cluster)
    require_results_dir(root.results_dir, write=True)
    try:
        row = run_cell(cell, Path(root.results_dir), progress=root.progress, cpu_fallback=root.cluster.cpu_fallback)
    except CellBusy as exc:
        raise ConfigError(str(exc)) from None
    # one line, last: scripts read it with `tail -1`
    print(json.dumps({k: row[k] for k in ("cell_id", "status", "selected_layers", "train_time_s",
                                           "eval_loss")}))
    return 0 if row["status"] == "ok" else 1


def cmd_prefetch(overrides, args) -> int:
    from aletheia_hpc.campaign.preflight import run_prefetch

    return run_prefetch(overrides, say=lambda text: print(text, file=sys.stderr, flush=True))


def cmd_aggregate(overrides, args) -> int:
    from aletheia_hpc.aggregate import aggregate_campaign, summary_table

    plan = _plan(overrides, write=True)
    names = plan.root.campaign.parts or [plan.name]
    results_dir = Path(plan.root.results_dir)
    for name in names:
        ids = {c.cell_id for c in plan.cells if c.campaign == name}
        found = {p.name for p in (results_dir / name / "cells").glob("*") if p.is_dir()}
        expected = len(ids)
        if found - ids:  # e.g. a results dir copied from a cluster, aggregated under another config
            expected = None
            print(f"{name}: {len(found - ids)} of the {len(found)} cell directories under {results_dir / name} are "
                  "not cells of this campaign config: aggregating every row found, without a completeness "
                  "check (give the campaign's own config, e.g. campaign=<name>, to check it)", file=sys.stderr)
        result = aggregate_campaign(results_dir, name, expected_cells=expected)
        print(summary_table(result))  # ends with the GPU-hours the accounting.json files beside the rows give
        if result.stats.get("staged"):
            from aletheia_hpc.aggregate.report import render_staged

            print("(the table above pairs each arm with the standard run of its own variant, else of matched at "
                  "stage-1 steps; the staged tables below compare at equal steps)")
            print("\n" + "\n".join(render_staged(result.stats["staged"])))
        print(f"report: {result.report_md}")
    return 0


@dataclass(frozen=True)
class Verb:
    """A verb of the CLI: the function that runs it (overrides, parsed flags) -> exit status, what it
    does, the flags it takes (names in FLAGS) and whether it takes CELL_IDs beside the overrides."""
    run: Callable[[list[str], argparse.Namespace], int]
    text: str
    flags: tuple[str, ...] = ()
    cell_ids: bool = False


def _seconds_between_refreshes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= MIN_WATCH_INTERVAL_S:  # also refuses nan; each refresh asks the scheduler once
        raise argparse.ArgumentTypeError(f"{text} s: give at least {MIN_WATCH_INTERVAL_S:g} s (each refresh asks "
                                         "the scheduler once)")
    return value


MIN_WATCH_INTERVAL_S = 1.0
# flag name -> (argparse option, its settings); a verb lists the names it takes
FLAGS = {
    "json": ("--json", dict(action="store_true", help="machine-readable output")),
    "force": ("--force", dict(action="append", metavar="CELL_ID", default=[],
                              help="rerun this cell from scratch even if done (repeatable)")),
    "retry_nan": ("--retry-nan", dict(action="store_true", help="run nan_abort cells again too (left alone by default)")),
    "advance_with_failures": ("--advance-with-failures", dict(
        action="store_true", help="decide a staged study's stage even though some of its cells failed")),
    "until_done": ("--until-done", dict(
        action="store_true", help="run a staged study's stages one after another here until it is complete")),
    "watch": ("--watch", dict(action="store_true", help="a live table (step N/total, elapsed, ETA) until no cell is busy")),
    "interval": ("--interval", dict(type=_seconds_between_refreshes, default=10.0,
                                    help=f"--watch: seconds between refreshes (>= {MIN_WATCH_INTERVAL_S:g}; default 10)")),
    "follow": ("--follow", dict(action="store_true", help="keep printing what the cell writes")),
    "sbatch": ("--sbatch", dict(action="store_true",
                                help="print the sbatch script of every resource class (submits nothing)")),
}
_LAUNCH_FLAGS = ("force", "retry_nan", "advance_with_failures", "until_done")
# verb -> Verb; adding a verb is one entry here. `resubmit` is `launch` under the name operators use for a rerun.
VERBS = {
    "plan": Verb(cmd_plan, "expand and validate the campaign, submit nothing", ("json", "sbatch")),
    "prefetch": Verb(cmd_prefetch, "fetch the campaign's hub models and data into the cluster's cache, pinned"),
    "launch": Verb(cmd_launch, "run or submit every cell that is not done and not queued", _LAUNCH_FLAGS),
    "status": Verb(cmd_status, "where every cell stands (cell files + one scheduler query)",
                   ("json", "watch", "interval")),
    "resubmit": Verb(cmd_launch, "the same as launch: failed and missing cells (--force, --retry-nan)", _LAUNCH_FLAGS),
    "cancel": Verb(cmd_cancel, "cancel every queued or running job of the campaign (SLURM)"),
    "logs": Verb(cmd_logs, "a cell's newest attempt log: logs CELL_ID [--follow]", ("follow",), cell_ids=True),
    "run-cell": Verb(cmd_run_cell, "run one cell here, in this process"),
    "aggregate": Verb(cmd_aggregate, "tables, statistics, figures and the report"),
}


def _parser() -> argparse.ArgumentParser:
    """The top level: which verb (its own parser, _verb_parser, takes the rest of the line)."""
    parser = argparse.ArgumentParser(
        prog="aletheia-hpc", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + "\n".join(f"  {verb:10s} {v.text}" for verb, v in VERBS.items())
        + "\n\n`aletheia-hpc VERB --help` lists the verb's own flags.")
    parser.add_argument("verb", choices=VERBS)
    return parser


def _verb_parser(name: str) -> argparse.ArgumentParser:
    verb = VERBS[name]
    parser = argparse.ArgumentParser(prog=f"aletheia-hpc {name}", description=verb.text)
    parser.add_argument("words", nargs="*", metavar="CELL_ID or key=value" if verb.cell_ids else "key=value",
                        help="Hydra overrides, e.g. campaign=smoke train.steps=5"
                             + ("; and the CELL_ID (a prefix will do)" if verb.cell_ids else ""))
    for flag in verb.flags:
        option, settings = FLAGS[flag]
        parser.add_argument(option, dest=flag, **settings)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The verb, then the verb's own parser: flags anywhere on the line, one the verb lacks is an error.
    Adds ``verb``, ``overrides`` (key=value words) and ``cell_ids`` (the other words)."""
    if not argv or argv[0] not in VERBS:
        _parser().parse_args(argv[:1] or [])  # --help, or the error naming the verbs
        raise SystemExit(2)
    name = argv[0]
    parser = _verb_parser(name)
    args = parser.parse_intermixed_args(argv[1:])
    args.verb = name
    args.overrides = [w for w in args.words if "=" in w]
    args.cell_ids = [w for w in args.words if "=" not in w]
    if args.cell_ids and not VERBS[name].cell_ids:
        parser.error(f"{' '.join(args.cell_ids)!r} is not a Hydra override (key=value)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        return VERBS[args.verb].run(args.overrides, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
