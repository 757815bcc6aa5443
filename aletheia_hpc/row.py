"""The result row: the one file a cell leaves behind, and what aggregation reads (beside it, also the
scheduler's accounting.json and the benchmarks' samples).

:class:`Row` is the schema, documented field by field where each is defined. A row is a flat
JSON object (``asdict(Row)``) written atomically to ``<results_dir>/<campaign>/cells/<cell_id>/row.json``.
A cell is *done* when that file exists and validates. Times are seconds; lists are JSON lists;
``None`` where a field does not apply (e.g. ``eval_loss`` of a failed cell).

Rows written before a field existed stay readable: fields not marked ``required`` take their
default when missing (:func:`read_row` fills them in).
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from aletheia_hpc.files import atomic_write

ROW_FILENAME = "row.json"
# Beside the row, on a SLURM cluster: the scheduler's accounting of every job that ran the cell
# (campaign status writes it; aggregation reads it for GPU-hours):
# {"jobs": {job_id: {elapsed_s, alloc_cpus, alloc_gpus, max_rss_mib}}, "gpu_hours", "elapsed_s"},
# cancelled and requeued runs included.
ACCOUNTING_FILENAME = "accounting.json"
# A staged study's decision on stage k (which arms advanced, on what figures, the next stage's cells),
# under the campaign directory; written by campaign.service, read back by planning and by aggregate.
STAGE_DECISION_FILE = "stages/stage{stage}.json"
STATUSES = ("ok", "failed", "nan_abort")
BASE_RECIPE = "base"
# the recipe name of a campaign's paired timing cells (campaign.timing=paired): one per model,
# timing every arm's steps interleaved; its row carries paired_timing and trains nothing
TIMING_RECIPE = "paired_timing"
DEFAULT_VARIANT = "matched"


def arm_name(recipe: str, variant: str) -> str:
    """The stable name of (recipe, variant): ``standard``, ``aletheia``, ``aletheia@compute_matched``,
    ``random_k``, ``aletheia@budget25``, ...; base-model cells are ``base``, paired timing cells
    ``paired_timing``."""
    if recipe in (BASE_RECIPE, TIMING_RECIPE) or variant in (DEFAULT_VARIANT, BASE_RECIPE):
        return recipe
    return f"{recipe}@{variant}"


def run_time_s(row: dict) -> float | None:
    """What a run cost, as the paper's wall-clock comparison counts it: training plus the probe (s)."""
    if row.get("train_time_s") is None:
        return None
    return float(row["train_time_s"]) + float(row.get("probe_time_s") or 0.0)


def _f(default: Any = None, *, group: str, required: bool = False, csv: str | None = "scalar"):
    """A row field. ``group`` sorts the schema for reading; ``required`` fields must be present in
    every row file; ``csv`` is how runs.csv carries it: ``scalar``, ``json`` (text) or None (left out)."""
    meta = {"group": group, "required": required, "csv": csv}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Row:
    # ----------------------------------------------------------------------------- identity
    campaign: str = _f("", group="identity", required=True)
    cell_id: str = _f("", group="identity", required=True)
    config_hash: str = _f("", group="identity", required=True, csv=None)  # equals cell_id
    model: str = _f("", group="identity", required=True)
    family: str = _f("", group="identity", required=True)
    # standard | aletheia | a selection control (random_k, bottom_k, middle_k, last_k) | base
    recipe: str = _f("", group="identity", required=True)
    # matched | compute_matched | any name a campaign's variant defines
    variant: str = _f(DEFAULT_VARIANT, group="identity", required=True)
    arm: str = _f("", group="identity")  # arm_name(recipe, variant); derived when missing
    seed: Any = _f(0, group="identity", required=True)
    # ------------------------------------------------------------------------------ outcome
    status: str = _f("ok", group="outcome", required=True)  # ok | failed | nan_abort
    failure_reason: Optional[str] = _f(None, group="outcome", required=True)  # None when ok
    nan_step: Optional[int] = _f(None, group="outcome")  # step at which a non-finite loss stopped it
    # ------------------------------------------------------------------------------- method
    num_layers: int = _f(0, group="method", required=True)
    selected_layers: Optional[list] = _f(None, group="method", required=True, csv="json")  # sorted
    # probe score per layer (index = layer); None for recipes that do not probe
    layer_scores: Optional[list] = _f(None, group="method", required=True, csv="json")
    # what the probe computed: {norm, loss_tokens, batch_size, batches, mode}; None without a probe
    probe: Optional[dict] = _f(None, group="method", csv="json")
    trainable_params: Optional[int] = _f(None, group="method", required=True)
    # the form a mixture-of-experts model's experts trained in (models/moe_experts.py): "per-expert nf4"
    # or "per-expert int8" (split into one quantized Linear per expert), "fused bf16" (unquantized,
    # fused 3-D tensors); None for a model without experts
    experts: Optional[str] = _f(None, group="method")
    # the step-cost model's predicted step-time ratio of all-layer LoRA to this selection
    # (aletheia_hpc/method/cost.py): 1.0 for standard, None without calibration; the measured
    # ratio comes from step_time_median_s of the paired standard cell
    predicted_speedup: Optional[float] = _f(None, group="method")
    predicted_step_time_s: Optional[float] = _f(None, group="method")  # the model's seconds per step
    # the calibrated model: {num_layers, fixed_s, backward_layer_s, adapter_layer_s, calibration_s}
    step_cost: Optional[dict] = _f(None, group="method", csv="json")
    cost_calibration_time_s: Optional[float] = _f(None, group="method")  # not part of train_time_s
    # layers whose output received an activation gradient in the first training step; more than
    # num_layers - min(selected_layers): backward ran below the lowest adapted layer (the cell warned)
    backward_layers: Optional[int] = _f(None, group="method")
    # backward dropping (recipe drop_backward): drop probability per layer (None: not adapted), and
    # the share of adapted sublayers the masks of the trained steps dropped (realised)
    drop_rates: Optional[list] = _f(None, group="method", csv="json")
    dropped_fraction: Optional[float] = _f(None, group="method")
    # a paired timing cell's (recipe paired_timing) measurement, per arm of the model:
    # {arm: {layers, predicted_speedup, predicted_step_time_s, step_times_s (one per timed round, rounds paired across
    # arms), median_step_s, ratio_vs_standard (median standard step / median arm step)}}
    paired_timing: Optional[dict] = _f(None, group="method", csv=None)
    # ----------------------------------------------------------------------------- training
    train_steps: Optional[int] = _f(0, group="training", required=True)  # optimizer steps completed
    planned_steps: Optional[int] = _f(None, group="training")
    train_time_s: Optional[float] = _f(None, group="training", required=True)  # summed over attempts
    probe_time_s: Optional[float] = _f(None, group="training", required=True)
    model_load_time_s: Optional[float] = _f(None, group="training")
    step_time_median_s: Optional[float] = _f(None, group="training", required=True)
    step_times_s: list = _f([], group="training", csv=None)  # per optimizer step
    final_train_loss: Optional[float] = _f(None, group="training", required=True)
    eval_loss: Optional[float] = _f(None, group="training", required=True)  # held-out loss
    # the learning curve (train.eval_every > 0): [{step, train_time_s, eval_loss}], from step 0;
    # train_time_s sums the step times up to that step (evaluation not included)
    curve: list = _f([], group="training", csv=None)
    attempts: Optional[int] = _f(None, group="training")
    # what went wrong and was recovered from (e.g. a damaged checkpoint set aside), one text each
    warnings: list = _f([], group="training", csv=None)
    # --------------------------------------------------------- evaluation (when benchmarks run)
    # names that ran; each benchmark's score/count fields below are the ones its entry in
    # aletheia_hpc/evaluation/benchmarks.py names; per-question results: <cell>/samples/<name>.jsonl
    benchmarks: Optional[list] = _f([], group="evaluation", csv="json")
    mmlu_acc: Optional[float] = _f(None, group="evaluation")
    mmlu_n: Optional[int] = _f(None, group="evaluation")
    gsm8k_acc: Optional[float] = _f(None, group="evaluation")
    gsm8k_n: Optional[int] = _f(None, group="evaluation")
    humaneval_pass1: Optional[float] = _f(None, group="evaluation")
    humaneval_n: Optional[int] = _f(None, group="evaluation")
    # held-out task accuracy: exact match on the cell's held-out instruction records
    task_acc: Optional[float] = _f(None, group="evaluation")
    task_n: Optional[int] = _f(None, group="evaluation")
    # multiple choice by log-likelihood (evaluation/choice.py): acc, acc_norm, questions
    arc_easy_acc: Optional[float] = _f(None, group="evaluation")
    arc_easy_n: Optional[int] = _f(None, group="evaluation")
    arc_easy_acc_norm: Optional[float] = _f(None, group="evaluation")
    arc_challenge_acc: Optional[float] = _f(None, group="evaluation")
    arc_challenge_n: Optional[int] = _f(None, group="evaluation")
    arc_challenge_acc_norm: Optional[float] = _f(None, group="evaluation")
    piqa_acc: Optional[float] = _f(None, group="evaluation")
    piqa_n: Optional[int] = _f(None, group="evaluation")
    piqa_acc_norm: Optional[float] = _f(None, group="evaluation")
    sciq_acc: Optional[float] = _f(None, group="evaluation")
    sciq_n: Optional[int] = _f(None, group="evaluation")
    sciq_acc_norm: Optional[float] = _f(None, group="evaluation")
    hellaswag_acc: Optional[float] = _f(None, group="evaluation")
    hellaswag_n: Optional[int] = _f(None, group="evaluation")
    hellaswag_acc_norm: Optional[float] = _f(None, group="evaluation")
    # the isolation every HumanEval run had: backend (bwrap | unshare | none), namespaces,
    # private_tmp, landlock_abi, seccomp, uid, rlimits, memory_total_bytes, disk_total_bytes,
    # features (eval.sandbox.require names), runs
    humaneval_sandbox: Optional[dict] = _f(None, group="evaluation", csv="json")
    eval_time_s: Optional[dict] = _f({}, group="evaluation", csv="json")  # benchmark -> seconds
    eval_source: Optional[dict] = _f({}, group="evaluation", csv="json")  # benchmark -> data source
    # ---------------------------------------------------------------------------- provenance
    started_at: Optional[str] = _f(None, group="provenance", required=True)  # ISO 8601 UTC
    finished_at: Optional[str] = _f(None, group="provenance")
    host: Optional[str] = _f(None, group="provenance", required=True)
    device: Optional[str] = _f(None, group="provenance", required=True)
    # the GPU's name; when requeued attempts trained on different hardware, every kind joined by
    # " + " (e.g. "NVIDIA A100 + cpu"), so that aggregation never takes the time for one machine's
    gpu_name: Optional[str] = _f(None, group="provenance")
    # the hub commit the model's files came from (pinned by prefetch, else the hub's main at load time);
    # None for local, GGUF and tiny models
    model_revision: Optional[str] = _f(None, group="provenance")
    git_sha: Optional[str] = _f(None, group="provenance", required=True)
    git_dirty: Optional[bool] = _f(None, group="provenance")
    package_versions: dict = _f({}, group="provenance", csv="json")
    # job_id, array_job_id, array_task_id, node; empty when not under SLURM (runs.csv: slurm_*)
    slurm: dict = _f({}, group="provenance", csv=None)
    config: dict = _f({}, group="provenance", csv=None)  # the resolved cell config

    def update(self, **values: Any) -> None:
        """Set several fields; a name that is not a field of the schema raises (no silent drift)."""
        unknown = sorted(set(values) - FIELD_NAMES)
        if unknown:
            raise AttributeError(f"not row fields: {', '.join(unknown)} (see aletheia_hpc/row.py)")
        for name, value in values.items():
            setattr(self, name, value)

    def to_dict(self) -> dict:
        return asdict(self)


FIELD_NAMES = frozenset(f.name for f in fields(Row))
# Every row file carries these keys; the value may be None where the field's comment says so.
REQUIRED_FIELDS = tuple(f.name for f in fields(Row) if f.metadata["required"])
# Evaluation fields (None for cells that ran no benchmark).
EVAL_FIELDS = tuple(f.name for f in fields(Row) if f.metadata["group"] == "evaluation")
# runs.csv: fields taken as they are, and fields written as JSON text
CSV_SCALAR_FIELDS = tuple(f.name for f in fields(Row) if f.metadata["csv"] == "scalar")
CSV_JSON_FIELDS = tuple(f.name for f in fields(Row) if f.metadata["csv"] == "json")


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


class InvalidRow(ValueError):
    """A row file that is missing, unreadable, truncated or violates the schema."""


# Seconds no cell's phase can take (a year): a larger time is a damaged or hand-edited row.
MAX_TIME_S = 365 * 24 * 3600.0
# the row's times, in seconds: scalars, a list per step, and a dict per benchmark
TIME_FIELDS = ("train_time_s", "probe_time_s", "model_load_time_s", "step_time_median_s",
               "cost_calibration_time_s", "predicted_step_time_s")


def _time_problem(name: str, value: Any, positive: bool) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name}={value!r} is not a finite number of seconds"
    if value < 0 or (positive and value == 0) or value > MAX_TIME_S:
        return (f"{name}={value!r} is not a possible time (seconds, {'> 0' if positive else '>= 0'} and at most "
                f"{MAX_TIME_S:.0f})")
    return None


def _times_problem(row: dict) -> str | None:
    """The first impossible time of ``row``; an ok training row must have trained for > 0 s."""
    trained = row["status"] == "ok" and row["recipe"] not in (BASE_RECIPE, TIMING_RECIPE)
    values = [(name, row.get(name), trained and name == "train_time_s") for name in TIME_FIELDS]
    steps = row.get("step_times_s") or []
    evals = row.get("eval_time_s") or {}
    if not isinstance(steps, list) or not isinstance(evals, dict):
        return "step_times_s must be a list and eval_time_s a mapping"
    values += [(f"step_times_s[{i}]", t, False) for i, t in enumerate(steps)]
    values += [(f"eval_time_s[{k}]", t, False) for k, t in evals.items()]
    return next((p for name, value, positive in values if (p := _time_problem(name, value, positive))), None)


def validate_row(row: Any, cell_id: str | None = None) -> dict:
    """Return ``row`` (with optional fields it lacks filled in) if it satisfies the schema, else
    raise InvalidRow naming the problem. ``cell_id``: the cell the row must belong to (the one
    validator: campaign status and aggregate both read rows through read_row, which gives it)."""
    if not isinstance(row, dict):
        raise InvalidRow(f"row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise InvalidRow(f"row is missing fields: {', '.join(missing)}")
    if row["status"] not in STATUSES:
        raise InvalidRow(f"status={row['status']!r} is not one of {STATUSES}")
    if row["cell_id"] != row["config_hash"]:
        raise InvalidRow("cell_id and config_hash differ")
    if cell_id is not None and row["cell_id"] != cell_id:
        raise InvalidRow(f"this row.json is not this cell's (cell_id={row['cell_id']}, its directory is {cell_id}): "
                         "it was copied or moved here; move it back to its own cell, or aside")
    problem = _times_problem(row)
    if problem:
        raise InvalidRow(problem)
    if row["status"] == "ok":
        if row["failure_reason"] is not None:
            raise InvalidRow("an ok row has a failure_reason")
        if row["recipe"] not in (BASE_RECIPE, TIMING_RECIPE):
            for key in ("train_time_s", "train_steps", "eval_loss"):
                value = row[key]
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise InvalidRow(f"an ok row needs a finite {key}, got {value!r}")
    elif not row["failure_reason"]:
        raise InvalidRow(f"a {row['status']} row needs a failure_reason")
    for f in fields(Row):
        if f.name not in row:
            row[f.name] = _default(f)
    if not row["arm"]:
        row["arm"] = arm_name(row["recipe"], row["variant"] or DEFAULT_VARIANT)
    return row


def write_row(path: Path, row: Row | dict) -> None:
    """Validate and write ``row`` atomically: readers see the old file, the new one, or none."""
    row = row.to_dict() if isinstance(row, Row) else dict(row)
    validate_row(row)
    atomic_write(Path(path), json.dumps(row, indent=1, sort_keys=True, allow_nan=False))


def read_accounting(cell_dir: Path) -> dict:
    """A cell directory's accounting.json ({} when absent or unreadable: no scheduler accounted it)."""
    try:
        known = json.loads((Path(cell_dir) / ACCOUNTING_FILENAME).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


class InvalidStageDecision(ValueError):
    """A stage decision file (STAGE_DECISION_FILE) that is unreadable, truncated or not that stage's."""


def read_stage_decision(campaign_dir: Path | str, stage: int) -> dict | None:
    """The decision on ``stage`` under a campaign directory, or None before it is decided. The one
    reader of these files (planning and aggregate both read them); InvalidStageDecision names the path."""
    path = Path(campaign_dir) / STAGE_DECISION_FILE.format(stage=stage)
    if not path.exists():
        return None
    try:
        decision = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        decision, why = None, f"cannot be read ({exc})"
    else:
        why = None if isinstance(decision, dict) and decision.get("stage") == stage else f"is not stage {stage}'s decision"
    if why:
        raise InvalidStageDecision(f"{path} {why}: restore it, or move it aside to decide stage {stage} again "
                                   "from its rows")
    return decision


def read_row(path: Path) -> dict:
    """Read and validate one row file, which must belong to the cell whose directory holds it;
    InvalidRow names the path on any defect."""
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRow(f"{path}: cannot read row ({exc})") from exc
    try:
        return validate_row(row, cell_id=Path(path).parent.name)
    except InvalidRow as exc:
        raise InvalidRow(f"{path}: {exc}") from exc
