"""Run one campaign cell: load, probe, select, adapt, train, evaluate, and write its row.

This is where the method library (torch) and the campaign machinery (files) meet. The outcome is
always one row file (ok, failed or nan_abort), except when the scheduler stops the cell for a
requeue: then a checkpoint and the attempt log are left for the next attempt, and no row.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from aletheia_hpc import provenance
from aletheia_hpc.campaign.store import (
    ATTEMPTS_FILE,
    DROP_PLAN_FILE,
    cell_path,
    move_row_aside,
    prepare_cell_dir,
    row_state,
)
from aletheia_hpc.config import CellConfig
from aletheia_hpc.files import atomic_write, cell_lock
from aletheia_hpc.row import ROW_FILENAME, Row, write_row

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised on purpose by a cell's fault config (tests of the campaign machinery)."""


def _next_attempt(work_dir: Path) -> int:
    path = work_dir / ATTEMPTS_FILE
    attempts = json.loads(path.read_text()) if path.exists() else []
    attempts.append({"started_at": provenance.utc_now(), "slurm": provenance.slurm_ids()})
    atomic_write(path, json.dumps(attempts, indent=1), fsync=False)
    return len(attempts)


def record_interruption(work_dir: Path, why: str) -> None:
    """Mark the cell's current attempt (attempts.json) as interrupted from outside (its launcher
    died), not failed: it wrote no row, and its checkpoint stays for the next attempt."""
    path = work_dir / ATTEMPTS_FILE
    attempts = json.loads(path.read_text())
    attempts[-1].update(interrupted=why, ended_at=provenance.utc_now())
    atomic_write(path, json.dumps(attempts, indent=1), fsync=False)


def _base_row(cell: CellConfig) -> Row:
    sha, dirty = provenance.git_state()
    return Row(
        campaign=cell.campaign, cell_id=cell.cell_id, config_hash=cell.cell_id, model=cell.model.name,
        family=cell.model.family, recipe=cell.recipe.name, variant=cell.variant, arm=cell.arm,
        seed=cell.seed, num_layers=cell.model.num_layers, planned_steps=cell.train.steps,
        started_at=provenance.utc_now(), host=provenance.host_name(), git_sha=sha, git_dirty=dirty,
        package_versions=provenance.package_versions(), slurm=provenance.slurm_ids(),
        config=cell.to_dict())


def probe_batches(train_examples, collator, batch_size: int, n_batches: int, seed: int, loss_tokens: str):
    """The probe's batches, drawn by the cell's seed; ``loss_tokens=all`` makes every non-padding
    token a target instead of the response only."""
    order = list(range(len(train_examples)))
    random.Random(seed).shuffle(order)
    picks = [train_examples[i] for i in order[: batch_size * n_batches]]
    batches = [collator(picks[i:i + batch_size]) for i in range(0, len(picks), batch_size)]
    if loss_tokens == "all":  # without labels the probe's loss covers every non-padding token
        for batch in batches:
            del batch["labels"]
    return batches


@dataclass
class Selection:
    """The layers a cell adapts and what chose them (probe scores, the step-cost model), and the
    backward-drop plan of a drop_backward recipe."""
    layers: list[int]
    scores: list[float] | None = None
    probe: dict | None = None  # what the probe computed (row.probe)
    probe_time_s: float | None = None
    cost: object | None = None  # the calibrated StepCostModel (SublayerCostModel when dropping), if any
    drop: object | None = None  # the DropPlan, if the recipe drops backward

    @property
    def keep(self) -> dict | None:
        return self.drop.keep_map() if self.drop is not None else None

    @property
    def predicted_speedup(self) -> float | None:
        if self.scores is None:
            return 1.0  # all-layer LoRA is the reference itself
        if self.drop is not None:
            return self.drop.predicted_speedup
        return self.cost.speedup(self.layers) if self.cost is not None else None

    @property
    def predicted_step_time_s(self) -> float | None:
        if self.cost is None:
            return None
        if self.drop is not None:
            return self.cost.expected_step_time(self.layers, self.keep)
        return self.cost.step_time(self.layers)

    def record(self, row: Row, steps: int) -> None:
        """The selection's fields of a training cell's row (``steps``: the cell's optimizer steps)."""
        row.predicted_speedup = self.predicted_speedup
        if self.scores is not None:
            row.update(probe_time_s=self.probe_time_s, probe=self.probe, layer_scores=self.scores)
        if self.cost is not None:
            row.update(cost_calibration_time_s=self.cost.calibration_s, step_cost=self.cost.to_dict(),
                       predicted_step_time_s=self.predicted_step_time_s)
        if self.drop is not None:
            row.update(drop_rates=self.drop.drop_rates(row.num_layers),
                       dropped_fraction=self.drop.dropped_fraction(steps))


def lora_ranks(recipe):
    """The recipe's adapter shape as the method library takes it."""
    from aletheia_hpc.method import LoraRanks

    return LoraRanks(recipe.attention_rank, recipe.mlp_rank, recipe.alpha_factor, recipe.dropout, recipe.modules)


def choose_layers(model, cell: CellConfig, recipe, train_examples, collator, family, prepare) -> Selection:
    """The layers ``recipe`` adapts on ``model`` (not yet wrapped) for ``cell``: all of them, or
    the probe's scores (batches drawn by the cell's seed), the step-cost calibration where the
    recipe has one (timing what ``prepare`` makes of the wrapped model), and the recipe's
    selection rule. Training cells and paired timing cells both choose here, so that the timing
    cell builds every arm as the arm's own cell does."""
    from aletheia_hpc.method import (calibrate_step_cost, plan_drop, probe_layer_scores, select_cost_aware,
                                     select_layers)

    m, r = cell.model, recipe
    if not r.probes:
        return Selection(list(range(m.num_layers)))
    probe_batch_size = r.probe.batch_size or m.batch_size
    batches = probe_batches(train_examples, collator, probe_batch_size, r.probe.batches, cell.seed,
                            r.probe.loss_tokens)
    t0 = time.perf_counter()
    scores = probe_layer_scores(model, batches, family=family, mode=r.probe.mode,
                                chunk_size=r.probe.chunk_size, norm=r.probe.norm)
    probe_time_s = time.perf_counter() - t0
    probe = {"norm": r.probe.norm, "loss_tokens": r.probe.loss_tokens, "batch_size": probe_batch_size,
             "batches": len(batches), "mode": r.probe.mode}
    cost = None
    if r.cost.calibration_steps:
        cost = calibrate_step_cost(model, batches, lora_ranks(r), family=family, steps=r.cost.calibration_steps,
                                   warmup=r.cost.calibration_warmup, prepare=prepare,
                                   max_grad_norm=cell.train.max_grad_norm, sublayers=r.drops_backward)
    if r.layers == "cost_aware":
        layers = select_cost_aware(scores, cost, r.cost.target_speedup, r.layer_pct)
    else:
        layers = select_layers(scores, r.layer_pct, r.layers, seed=cell.seed)
    drop = None
    if r.drops_backward:
        drop = plan_drop(scores, layers, cost, r.drop.target_speedup, seed=cell.seed, guidance=r.drop.rates,
                         min_keep=r.drop.min_keep, warmup_steps=r.drop.warmup_steps)
    return Selection(layers, scores, probe, probe_time_s, cost, drop)


def _first_attempts_plan(path: Path, selection: Selection):
    """The drop plan of the cell's first attempt, kept in ``path``: a resumed attempt's calibration
    times other steps and would scale other rates, but its masks must replay the first attempt's."""
    from aletheia_hpc.method import DropPlan

    if not path.exists():
        atomic_write(path, json.dumps(selection.drop.to_dict()))
        return selection.drop
    plan = DropPlan.from_dict(json.loads(path.read_text()))
    if list(plan.layers) != selection.layers:
        raise RuntimeError(f"{path} drops sublayers of layers {list(plan.layers)}, but this attempt adapts "
                           f"{selection.layers}: move the cell's directory aside to train it from scratch")
    return plan


def train_optimizer(model, cell: CellConfig):
    """The optimizer a training cell's LoRA model trains with (method/step.py), at the cell's
    learning rate: the worker's Trainer and the paired timing cell both build it here."""
    from aletheia_hpc.method import lora_optimizer

    t = cell.train
    return lora_optimizer(model, lr=cell.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                          weight_decay=t.weight_decay)


def _paired_timing(cell: CellConfig, model, train_examples, collator, family, prepare, device, row: Row,
                   stop) -> None:
    """A paired timing cell: every arm of the model built as its cell of this seed builds it (one
    copy of the model per arm), then ``timing.warmup`` untimed and ``timing.rounds`` timed rounds of
    one optimizer step per arm, interleaved (method/timing.py), all arms on the same batches.

    A stop request before an arm is built or before a round ends the attempt with nothing kept: the
    next attempt times every round again, since ratios are only paired when one job on one node
    measured them all."""
    from aletheia_hpc.method import BackwardDropper, apply_lora, lora_step, time_interleaved
    from aletheia_hpc.models.loading import load_model
    from aletheia_hpc.worker.training import StopForRequeue

    timing, m, t = cell.timing, cell.model, cell.train

    def stop_point(where: str) -> None:
        if stop.requested:
            raise StopForRequeue(f"stop requested {where} of the paired timing; the next attempt times it all again")

    arms, selections = {}, {}
    for i, arm in enumerate(timing.arms):
        stop_point(f"before building arm {arm.arm!r}")
        selections[arm.arm] = choose_layers(model, cell, arm.recipe, train_examples, collator, family, prepare)
        # a fresh load per arm (quantized weights cannot be deep-copied); the last arm takes the
        # model the probes ran on
        arm_model = model if i == len(timing.arms) - 1 else load_model(m, device, row.model_revision)[0]
        peft_model = apply_lora(arm_model, family, selections[arm.arm].layers, lora_ranks(arm.recipe))
        if prepare is not None:
            prepare(peft_model)
        peft_model.train()
        drop = selections[arm.arm].drop
        arms[arm.arm] = (peft_model, train_optimizer(peft_model, cell),
                         BackwardDropper(peft_model, family, drop) if drop is not None else None)
    order = list(range(len(train_examples)))
    random.Random(cell.seed).shuffle(order)
    per_round = m.batch_size * t.grad_accum
    rounds = [[collator([train_examples[order[(n * per_round + j) % len(order)]]
                         for j in range(k * m.batch_size, (k + 1) * m.batch_size)])
               for k in range(t.grad_accum)] for n in range(timing.warmup + timing.rounds)]
    rounds = [[{key: value.to(device) for key, value in b.items()} for b in micro] for micro in rounds]
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(m.precision) if device.type == "cuda" else None

    def step(name: str):
        peft_model, optimizer, drop = arms[name]

        def run(i: int) -> None:  # round i is the arm's optimizer step i + 1 (its drop mask too)
            lora_step(peft_model, rounds[i], optimizer, max_grad_norm=t.max_grad_norm, autocast_dtype=autocast,
                      drop=drop, step=i + 1)
        return run

    times = time_interleaved({name: step(name) for name in arms}, rounds=timing.rounds, warmup=timing.warmup,
                             device=device, before_round=lambda i: stop_point(f"before round {i + 1}"))
    for _, _, drop in arms.values():
        if drop is not None:
            drop.remove()
    medians = {name: statistics.median(values) for name, values in times.items()}
    row.paired_timing = {
        name: {"layers": selections[name].layers, "predicted_speedup": selections[name].predicted_speedup,
               "predicted_step_time_s": selections[name].predicted_step_time_s, "step_times_s": times[name], "median_step_s": medians[name],
               "ratio_vs_standard": medians["standard"] / medians[name]}
        for name in arms}
    row.update(train_steps=timing.rounds, train_time_s=sum(sum(v) for v in times.values()))
    log.info("cell %s: paired timing over %d rounds: %s", cell.cell_id, timing.rounds,
             ", ".join(f"{name} {medians[name]:.3f}s ({medians['standard'] / medians[name]:.3f}x)" for name in arms))


def _train_and_evaluate(cell: CellConfig, work_dir: Path, row: Row, stop, progress: bool,
                        cpu_fallback: bool) -> None:
    """Fill ``row`` in place; raises NonFiniteLoss / StopForRequeue / anything else on failure."""
    from aletheia_hpc.data.instructions import PadCollator, load_records, split_records, tokenize_records
    from aletheia_hpc.method import apply_lora, enable_selective_checkpointing, get_family
    from aletheia_hpc.models.loading import load_model, loaded_revision, resolve_device
    from aletheia_hpc.models.moe_experts import experts_in, family_for
    from aletheia_hpc.models.prefetch import pinned_revision
    from aletheia_hpc.worker.training import train_cell

    m, r = cell.model, cell.recipe
    if cell.eval.benchmarks:
        from aletheia_hpc.evaluation.runner import preflight
        preflight(cell.eval)  # a node whose sandbox cannot give eval.sandbox.require fails here
    device = resolve_device(m, cpu_fallback=cpu_fallback)
    # what the scheduler granted, beside what the cell asked for: the first thing to read when a
    # multi-GPU cell misbehaves
    log.info("cell %s: device %s, model.resources.gpus=%d, CUDA_VISIBLE_DEVICES=%s, precision %s, "
             "quantization %s", cell.cell_id, device.type, m.resources.gpus,
             os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), m.precision, m.quantization)
    if device.type == "cpu" and m.resources.gpus:
        log.warning("cell %s asked for %d GPU(s) and sees none: training on the CPU (cluster.cpu_fallback)",
                    cell.cell_id, m.resources.gpus)
    row.device = device.type
    row.gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    revision = pinned_revision(work_dir.parent.parent, m.path) if m.kind == "hub" else None
    model, tokenizer = load_model(m, device, revision)
    row.model_load_time_s = time.perf_counter() - t0
    row.experts = experts_in(model)
    row.model_revision = loaded_revision(m, revision)

    records = load_records(cell.data.source, cell.data.builtin_size)
    train_records, held_out = split_records(records, cell.data.eval_size, cell.data.split_seed)
    train_examples = tokenize_records(train_records, tokenizer, m.max_seq_len, cell.data.template)
    eval_examples = tokenize_records(held_out, tokenizer, m.max_seq_len, cell.data.template)
    collator = PadCollator(tokenizer.pad_token_id)

    if r.evaluates_only:
        _evaluate(cell, model, tokenizer, eval_examples, held_out, collator, device, row, stop,
                  progress, work_dir)
        return

    family = family_for(model, get_family(m.family))  # per-expert targets once the experts are split
    prepare = enable_selective_checkpointing if m.gradient_checkpointing else None
    if cell.timing is not None:
        _paired_timing(cell, model, train_examples, collator, family, prepare, device, row, stop)
        return
    selection = choose_layers(model, cell, r, train_examples, collator, family, prepare)
    if selection.drop is not None:
        selection.drop = _first_attempts_plan(work_dir / DROP_PLAN_FILE, selection)
    selection.record(row, cell.train.steps)
    layers = selection.layers
    row.selected_layers = layers
    model = apply_lora(model, family, layers, lora_ranks(r))
    if prepare is not None:
        prepare(model)
    row.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    from aletheia_hpc.method import BackwardDropper
    from aletheia_hpc.worker.training import held_out_loss

    drop = BackwardDropper(model, family, selection.drop) if selection.drop is not None else None
    curve_loss = None
    if cell.train.eval_every:
        def curve_loss() -> float:
            return held_out_loss(model, eval_examples, collator, m.batch_size, device)
    try:
        outcome = train_cell(model, tokenizer, train_examples, collator, cell.train,
                             optimizer=train_optimizer(model, cell), lr=cell.learning_rate,
                             batch_size=m.batch_size, precision=m.precision, seed=cell.seed,
                             work_dir=work_dir, device=device, stop=stop, faults=cell.faults,
                             progress=progress, family=family, drop=drop, curve_loss=curve_loss)
    finally:
        if drop is not None:
            drop.remove()
    row.update(train_steps=outcome.steps, train_time_s=outcome.train_time_s,
               step_times_s=outcome.step_times_s, step_time_median_s=outcome.step_time_median_s,
               final_train_loss=outcome.final_train_loss, warnings=row.warnings + outcome.warnings,
               backward_layers=outcome.backward_layers, curve=outcome.curve)
    if selection.drop is not None:
        row.dropped_fraction = selection.drop.dropped_fraction(outcome.steps)
    for warning in outcome.warnings:
        log.warning("cell %s: %s", cell.cell_id, warning)
    expected_backward = m.num_layers - min(layers)
    if outcome.backward_layers is not None and outcome.backward_layers > expected_backward:
        log.warning("cell %s: backward ran through %d layers in the first step, but the lowest adapted layer "
                    "is %d, so %d would do: something below it requires grad (an input-embedding "
                    "require-grads hook added for activation checkpointing?); the selection's speedup is "
                    "partly lost", cell.cell_id, outcome.backward_layers, min(layers), expected_backward)
    if len(outcome.hardware) > 1:  # requeued onto other hardware: the train time mixes both
        row.gpu_name = " + ".join(outcome.hardware)
    _evaluate(cell, model, tokenizer, eval_examples, held_out, collator, device, row, stop, progress,
              work_dir)


def _evaluate(cell: CellConfig, model, tokenizer, eval_examples, held_out, collator, device, row: Row,
              stop, progress: bool, work_dir: Path) -> None:
    """Held-out loss, then the benchmarks; a stop request between them ends the attempt (training
    is checkpointed at its last step, so the next attempt only evaluates)."""
    from aletheia_hpc.worker.training import StopForRequeue, held_out_loss

    def stop_point(phase: str) -> None:
        if stop.requested:
            raise StopForRequeue(f"stop requested before evaluation phase {phase!r}")

    stop_point("held-out loss")
    row.eval_loss = held_out_loss(model, eval_examples, collator, cell.model.batch_size, device)
    if not cell.eval.benchmarks:
        return
    from aletheia_hpc.evaluation import run_benchmarks

    row.update(**run_benchmarks(model, tokenizer, cell.eval, device=device, progress=progress,
                                before_each=stop_point, held_out=held_out,
                                template=cell.data.template, cell_dir=work_dir))


def run_cell(cell: CellConfig, results_dir: Path, *, stop=None, progress: bool = True,
             cpu_fallback: bool = False, dispatched: bool = False) -> dict:
    """Run ``cell`` and write its row under results_dir; return the row.

    The cell's lock (files.cell_lock) is held throughout, so that no cell trains twice at once:
    run-cell refuses (CellBusy, naming the writer that holds it); a ``dispatched`` worker (local
    launch, SLURM task) waits for it, and when the writer it waited for left an ok row, returns that
    row and runs nothing. Any row already there is kept aside as row.json.replaced-<time> before the
    cell runs again.

    A non-finite loss gives a nan_abort row; any other exception a failed row (then re-raised, so
    the scheduler records the failure too). A stop request for requeue re-raises StopForRequeue
    with no row written. ``cpu_fallback``: a cell that asked for GPUs may train on the CPU when
    there are none (clusters with declared, not real, GPUs); otherwise it fails.
    """
    work_dir = cell_path(results_dir, cell)
    if not work_dir.exists():
        prepare_cell_dir(results_dir, cell)
    slurm_job = provenance.slurm_ids().get("job_id")
    by = "run-cell" if not dispatched else f"SLURM job {slurm_job}" if slurm_job else "a local launch's worker"
    holder = {"by": by, "pid": os.getpid(), "host": provenance.host_name(), "started_at": provenance.utc_now()}
    with cell_lock(work_dir, holder, wait=dispatched, on_wait=lambda who: log.warning("%s; waiting", who)):
        done = row_state(results_dir, cell).row
        if dispatched and done is not None and done["status"] == "ok":
            log.info("cell %s has an ok row (the writer waited for finished it): not run again", cell.cell_id)
            return done
        moved = move_row_aside(results_dir, cell)
        if moved:
            log.info("cell %s: old row kept as %s", cell.cell_id, moved)
        return _run_locked(cell, work_dir, stop, progress, cpu_fallback)


def _run_locked(cell: CellConfig, work_dir: Path, stop, progress: bool, cpu_fallback: bool) -> dict:
    from aletheia_hpc.worker.stop import StopSignal
    from aletheia_hpc.worker.training import NonFiniteLoss, StopForRequeue

    started = time.perf_counter()
    attempt = _next_attempt(work_dir)
    row = _base_row(cell)
    row.attempts = attempt
    torch.manual_seed(cell.seed)
    try:
        if cell.faults.raise_on_attempt == attempt:
            raise InjectedFault(f"fault injected on attempt {attempt}")
        if cell.noop:  # its time is what the no-op took: a row's train time is > 0
            row.update(train_time_s=time.perf_counter() - started, eval_loss=0.0, train_steps=cell.train.steps,
                       device="none")
        else:
            _train_and_evaluate(cell, work_dir, row, stop or StopSignal(), progress, cpu_fallback)
    except NonFiniteLoss as exc:
        row.update(status="nan_abort", failure_reason=f"nan_abort: {exc}", nan_step=exc.step)
    except StopForRequeue:
        raise
    except BrokenPipeError as exc:  # the output pipe: the launcher died, the cell did not fail
        raise StopForRequeue(f"the launcher's output pipe broke ({exc}); the checkpoints are kept") from exc
    except Exception as exc:
        tail = "".join(traceback.format_exception(exc)[-3:]).strip()
        row.update(status="failed", failure_reason=f"exception: {type(exc).__name__}: {exc}\n{tail}")
        row.finished_at = provenance.utc_now()
        write_row(work_dir / ROW_FILENAME, row)
        raise
    row.finished_at = provenance.utc_now()
    write_row(work_dir / ROW_FILENAME, row)
    log.info("cell %s (%s/%s/seed %s) finished: %s", cell.cell_id, cell.model.name, cell.recipe.name,
             cell.seed, row.status)
    return row.to_dict()
