"""The campaign service: launch, status, resubmit and cancel, decided once for every cluster.

A campaign (``paper``) may be made of parts (``paper_c1``, ``paper_c2``); every cell lives in its
part's directory with its own job records, so the service never needs to know which campaign
submitted a cell. The dispatcher (campaign.local or campaign.slurm, one interface:
campaign.dispatch) only runs, observes and cancels jobs; the state of each cell comes from
campaign.state.cell_state.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from aletheia_hpc.campaign.dispatch import Dispatcher, SchedulerView, Submission
from aletheia_hpc.campaign.matrix import Plan, StagePlan
from aletheia_hpc.campaign.preflight import require_inputs
from aletheia_hpc.campaign.state import BUSY, cell_state
from aletheia_hpc.campaign.store import (cell_logs, cell_path, latest_job, launch_lock_path, move_progress_aside,
                                         move_row_aside, read_progress, record_accounting, row_state,
                                         take_snapshot, write_stage_decision)
from aletheia_hpc.config import CellConfig, ClusterConfig, ConfigError
from aletheia_hpc.files import LockHeld, file_lock
from aletheia_hpc.provenance import host_name, utc_now


def require_placement(cells: list[CellConfig], cluster: ClusterConfig) -> None:
    """Refuse, before anything runs, every cell whose GPUs, CPUs or memory the cluster can never give
    (a local cluster counts this machine's GPUs)."""
    from aletheia_hpc.campaign.local import with_local_gpus
    from aletheia_hpc.campaign.matrix import cell_label, placement_problem

    cluster = with_local_gpus(cluster)
    problems = [f"cell {c.cell_id} ({cell_label(c)}) {problem}"
                for c in cells if (problem := placement_problem(c, cluster))]
    if problems:
        raise ConfigError(f"{len(problems)} cell(s) cannot run as asked on cluster {cluster.name}:\n  "
                          + "\n  ".join(problems))


def dispatcher_for(plan: Plan, results_dir: Path) -> Dispatcher:
    cluster = plan.root.cluster
    if cluster.kind == "slurm":
        from aletheia_hpc.campaign.slurm import SlurmDispatcher

        return SlurmDispatcher(cluster)
    if cluster.kind == "local":
        from aletheia_hpc.campaign.local import LocalDispatcher

        return LocalDispatcher(cluster, results_dir)
    raise ConfigError(f"cluster.kind={cluster.kind!r}: use local or slurm")


def gpu_hours_per_arm(cells: list[dict]) -> dict[str, dict]:
    """{arm: {cells, gpu_hours}} over the cells (status dicts) the scheduler has accounted so far,
    any state: the live view of what the campaign spends. What an arm saved against Standard is a
    property of the finished pairs: aggregate gives it (stats.json ``cost``)."""
    per_arm: dict[str, dict] = {}
    for c in cells:
        if c["gpu_hours"] is not None:
            arm = per_arm.setdefault(c["arm"], {"cells": 0, "gpu_hours": 0.0})
            arm["cells"] += 1
            arm["gpu_hours"] += c["gpu_hours"]
    return per_arm


def stage_summary(stage: StagePlan, states: dict[str, str]) -> dict:
    """Where one stage of a staged study stands: its cells' states, and whether it may be decided
    (``complete``: every cell done; ``ended``: none queued, running or missing, some failed)."""
    ids = list(dict.fromkeys(m["cell_id"] for m in stage.cells))
    counts = dict(Counter(states[cid] for cid in ids))
    settled = not any(s in BUSY or s == "missing" for s in counts)
    d = stage.decision
    return {"stage": stage.stage, "cells": len(ids), "counts": counts, "complete": counts.get("done", 0) == len(ids),
            "ended": settled, "decided": d is not None,
            "advanced": d.get("advanced") if d else None, "winner": d.get("winner") if d else None}


@dataclass
class Status:
    cells: list[dict]  # per cell: cell_id, campaign, model, recipe, arm, variant, seed, state, reason, job_id
    view: SchedulerView
    stages: list[dict] = field(default_factory=list)  # a staged study: stage_summary of each stage so far
    study_complete: bool = False

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(c["state"] for c in self.cells))

    @property
    def note(self) -> str | None:
        """One line when the states rest on less than the scheduler's accounting."""
        return f"note: {self.view.problem}" if self.view.problem else None

    @property
    def cost(self) -> dict:
        return {"per_arm": gpu_hours_per_arm(self.cells)}

    def to_json(self) -> dict:
        return {"counts": self.counts, "source": self.view.source, "note": self.view.problem, "cost": self.cost,
                "stages": self.stages, "study_complete": self.study_complete, "cells": self.cells}


@dataclass
class Launch:
    before: Status
    todo: list[CellConfig]
    submission: Submission | None = None
    snapshots: dict[str, Path] = field(default_factory=dict)
    stage: int | None = None  # a staged study: the stage whose cells were submitted
    held: str | None = None  # why the current stage is not decided (failed cells), if so
    study_complete: bool = False

    @property
    def failed_cells(self) -> list[str]:
        return [cid for cid, code in (self.submission.exit_codes if self.submission else {}).items() if code]


def _log_tail(work: Path, lines: int = 5) -> str:
    logs = cell_logs(work)
    if not logs:
        return ""
    return "\n".join(logs[-1].read_text(errors="replace").strip().splitlines()[-lines:])


class CampaignService:
    def __init__(self, plan: Plan, say=None):
        self.cluster = plan.root.cluster
        self.results_dir = Path(plan.root.results_dir).resolve()
        self.dispatcher = dispatcher_for(plan, self.results_dir)
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self._set_plan(plan)

    def _set_plan(self, plan: Plan) -> None:
        self.plan = plan
        self.by_id = {c.cell_id: c for c in plan.cells}
        self.parts = list(dict.fromkeys(c.campaign for c in plan.cells))

    # ------------------------------------------------------------------ status

    def status(self) -> Status:
        """Every cell's state from its files plus ONE question to the scheduler for the campaign."""
        jobs = {c.cell_id: job for c in self.plan.cells if (job := latest_job(self.results_dir, c))}
        asked = {cid: j for cid, j in jobs.items() if j.get("cluster", self.cluster.name) == self.cluster.name}
        view = self.dispatcher.observe(asked)
        now = time.time()
        out = []
        for cell in self.plan.cells:
            rs = row_state(self.results_dir, cell)
            job = jobs.get(cell.cell_id)
            sched = (view.states.get(job["job_id"]) or view.states.get(job.get("array_job_id", ""))) if job else None
            st = cell_state(cell.cell_id, rs.row, rs.problem, job, sched, view.source, now, self.cluster.name)
            reason = st.reason
            if job and st.state in BUSY and (runs := view.earlier_runs.get(job["job_id"])):
                reason = f"{reason}; requeued after {', '.join(runs)}"  # a node failure, a preemption
            usage = None
            if job and job["job_id"] in view.accounting and st.state not in BUSY:
                usage = record_accounting(self.results_dir, cell, job["job_id"], view.accounting[job["job_id"]])
            if st.show_log:
                tail = _log_tail(cell_path(self.results_dir, cell))
                reason = (reason or "") + (f"\n{tail}" if tail else "")
            out.append({"cell_id": cell.cell_id, "campaign": cell.campaign, "model": cell.model.name,
                        "recipe": cell.recipe.name, "arm": cell.arm, "variant": cell.variant, "seed": cell.seed,
                        "state": st.state, "reason": reason, "job_id": job["job_id"] if job else None,
                        "gpu_hours": usage["gpu_hours"] if usage else None,
                        "elapsed_s": usage["elapsed_s"] if usage else None})
        states = {c["cell_id"]: c["state"] for c in out}
        return Status(out, view, [stage_summary(s, states) for s in self.plan.stages], self.plan.study_complete)

    def progress(self, status: Status) -> list[dict]:
        """Per cell of ``status``: steps done of planned (progress.json), training seconds so far and
        the ETA of a busy cell from its median step time."""
        out = []
        for c in status.cells:
            cell = self.by_id[c["cell_id"]]
            p = read_progress(self.results_dir, cell)
            step, times = (p.step, p.step_times_s) if p else (0, [])
            total = cell.train.steps if cell.trains else 0
            eta = None
            if c["state"] in BUSY and times and total:
                eta = statistics.median(times) * max(total - step, 0)
            out.append({**c, "step": step, "steps": total, "elapsed_s": sum(times), "eta_s": eta})
        return out

    # ------------------------------------------------------------------ launch / resubmit

    def launch(self, force: list[str] = (), retry_nan: bool = False, advance_with_failures: bool = False,
               until_done: bool = False) -> Launch:
        """Run (local) or queue (SLURM) every cell that is not done and not queued: missing and failed
        cells, nan_abort cells only with ``retry_nan`` (a deterministic overflow would burn the same
        hours again), and the ``force``d cells (from scratch, done or not). Old rows are kept aside.

        A staged study first decides every stage that is complete (``advance_with_failures``: also one
        whose failed cells did not run again), then runs the current stage's cells only; ``until_done``
        (local) repeats that until the study is complete or a stage is held by failed cells."""
        # every cell, before anything (a lock, a snapshot) is written: as plan refuses it, so does launch
        require_placement(self.plan.cells, self.cluster)
        require_inputs(self.plan)  # compute nodes without internet: every input prefetched, or nothing runs
        force = list(dict.fromkeys(force))
        unknown = [cid for cid in force if cid not in self.by_id]
        if unknown:
            raise ConfigError(f"--force: no such cell in campaign {self.plan.name}: {', '.join(unknown)}; "
                              f"`aletheia-hpc status` lists the cell ids")
        if until_done and (self.dispatcher.kind != "local" or not self.plan.stages):
            raise ConfigError("--until-done runs a staged study (campaign.stages) on a local cluster; on SLURM, "
                              "run launch again once the current stage's jobs have ended")
        if not self.plan.stages:
            action = lambda: self._launch(force, retry_nan)
        else:
            action = lambda: self._launch_stages(force, retry_nan, advance_with_failures, until_done)
        if self.dispatcher.kind == "local":
            return self._locked(action)
        return action()

    def _launch_stages(self, force: list[str], retry_nan: bool, advance_with_failures: bool,
                       until_done: bool) -> Launch:
        while True:
            held = self.advance(advance_with_failures)
            if self.plan.study_complete:
                result = Launch(self.status(), [], Submission(cells=0), study_complete=True)
                self.say(f"study complete: {self._study_line()}")
                return result
            stage = self.plan.current_stage
            if held:
                self.say(held)
            result = self._launch(force, retry_nan, only=[m["cell_id"] for m in stage.cells])
            result.stage, result.held = stage.stage, held
            force = []  # a forced cell reruns once, not once per stage
            stopped = result.submission is not None and result.submission.stopped_by
            if not until_done or stopped or result.failed_cells or not result.todo and held:
                return result

    def _study_line(self) -> str:
        return "; ".join(f"stage {s.stage}: advanced {', '.join(s.decision['advanced']) or '-'}"
                         + (f", winner {s.decision['winner']}" if s.decision.get("winner") else "")
                         for s in self.plan.stages if s.decision)

    def advance(self, with_failures: bool = False) -> str | None:
        """Decide every complete stage of a staged study, in order, writing stage<k>.json and planning
        again from it. Returns why the current stage is held (a failed cell), or None."""
        from aletheia_hpc.campaign.matrix import expand, next_stage
        from aletheia_hpc.campaign.stages import decide

        while not self.plan.study_complete:
            stage = self.plan.current_stage
            summary = self.status().stages[-1]
            if not (summary["complete"] or (with_failures and summary["ended"])):
                failed = sum(n for s, n in summary["counts"].items() if s in ("failed", "nan_abort"))
                if summary["ended"] and failed:
                    return (f"stage {stage.stage} is held: {failed} of its {summary['cells']} cells failed; "
                            "launch runs them again, or --advance-with-failures decides on the rest")
                return None
            rows = {cid: row_state(self.results_dir, self.by_id[cid]).row
                    for cid in dict.fromkeys(m["cell_id"] for m in stage.cells)}
            try:
                decision = decide(stage.to_dict(), rows, self.plan.root.campaign.stages)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if decision["next"] is not None:
                decision["next"]["cells"] = next_stage(self.plan, decision)[1]
            path = write_stage_decision(self.results_dir, self.plan.name, decision)
            self.say(f"stage {stage.stage} decided ({path}): advanced {', '.join(decision['advanced']) or '-'}"
                     + (f"; winner {decision['winner']}" if decision.get("winner") else ""))
            self._set_plan(expand(self.plan.overrides))  # planning again reads the decision back
        return None

    def _launch(self, force: list[str], retry_nan: bool, only: list[str] | None = None) -> Launch:
        before = self.status()
        state = {c["cell_id"]: c["state"] for c in before.cells}
        busy = [cid for cid in force if state[cid] in BUSY]
        if busy:
            raise ConfigError(f"--force: cells queued or running (cancel them first): {', '.join(busy)}")
        wanted = {"failed", "missing"} | ({"nan_abort"} if retry_nan else set())
        todo = [c for c in self.plan.cells if c.cell_id in force
                or (state[c.cell_id] in wanted and (only is None or c.cell_id in only))]
        require_placement(todo, self.cluster)
        result = Launch(before, todo)
        self._report_launch(result)
        if not todo:
            result.submission = Submission(cells=0)
            return result
        for cell in todo:
            if cell.cell_id in force:
                move_progress_aside(self.results_dir, cell)  # a forced rerun starts from scratch
            moved = move_row_aside(self.results_dir, cell)
            if moved:
                self.say(f"cell {cell.cell_id}: old row kept as {moved}")
        result.snapshots = take_snapshot(self.results_dir, list(dict.fromkeys(c.campaign for c in todo)))
        result.submission = self.dispatcher.submit(todo, self.results_dir, result.snapshots)
        return result

    def _report_launch(self, launch: Launch) -> None:
        counts, todo = launch.before.counts, {c.cell_id for c in launch.todo}
        left_nan = sum(c["state"] == "nan_abort" and c["cell_id"] not in todo for c in launch.before.cells)
        self.say(f"campaign {self.plan.name}: {len(self.plan.cells)} cells, {counts.get('done', 0)} already done, "
                 f"{sum(counts.get(s, 0) for s in BUSY)} queued or running, "
                 + (f"{left_nan} nan_abort left alone (--retry-nan runs them again), " if left_nan else "")
                 + f"{len(launch.todo)} to run on {self.cluster.name}")
        if launch.before.note:
            self.say(launch.before.note)

    def _locked(self, action):
        """Run ``action`` holding every part's launch lock: a second local launch of the same cells
        refuses, naming the one that runs."""
        holder = json.dumps({"launch": self.dispatcher.launch_id, "pid": os.getpid(), "host": host_name(),
                             "started_at": utc_now()})
        with ExitStack() as stack:
            for part in sorted(self.parts):
                try:
                    stack.enter_context(file_lock(launch_lock_path(self.results_dir, part), wait=False,
                                                  holder=holder))
                except LockHeld as exc:
                    try:
                        other = json.loads(exc.holder)
                        who = f"pid {other['pid']} on host {other['host']}, started {other['started_at']}"
                    except (ValueError, KeyError):
                        who = "a process that left no details"
                    raise ConfigError(f"campaign part {part} is being launched already by {who}; wait for it "
                                      "to finish (or stop it) before launching again") from None
            return action()

    # ------------------------------------------------------------------ cancel

    def cancel(self) -> list[str]:
        """Cancel every queued or running job of the campaign, all parts, in one call."""
        st = self.status()
        if st.view.source == "none":
            raise ConfigError(f"cancel: {st.view.problem}; nothing cancelled")
        ids = sorted({c["job_id"] for c in st.cells if c["state"] in ("pending", "running") and c["job_id"]})
        return self.dispatcher.cancel(ids)
