"""The result row: the one file a cell leaves behind, and the only thing aggregation reads.

This module is the single documentation of the schema. A row is a flat JSON object written
atomically to ``<results_dir>/<campaign>/cells/<cell_id>/row.json``. A cell is *done* when that
file exists and validates. Times are seconds; lists are JSON lists.

Fields (``None`` where a field does not apply, e.g. ``eval_loss`` of a failed cell):

identity
  campaign, cell_id, config_hash (equals cell_id), model, family, recipe
  (``standard`` | ``aletheia`` | ``base`` for a base-model evaluation cell), variant
  (``matched`` | ``compute_matched`` | any name a campaign defines), seed
outcome
  status (``ok`` | ``failed`` | ``nan_abort``), failure_reason (text; ``None`` when ok),
  nan_step (optimizer step at which a non-finite loss stopped the cell)
method
  num_layers, selected_layers (sorted list of layer indices that got adapters),
  layer_scores (probe score per layer, index = layer; ``None`` for the standard recipe),
  trainable_params,
  predicted_speedup (the step-cost model's predicted step-time ratio of all-layer LoRA to this
  cell's selection, aletheia_hpc/method/cost.py; 1.0 for standard, ``None`` without calibration;
  the measured ratio comes from step_time_median_s of the paired standard cell),
  predicted_step_time_s (the model's predicted seconds per optimizer step for the selection),
  step_cost (object: num_layers, fixed_s, backward_layer_s, adapter_layer_s, calibration_s: the
  calibrated model), cost_calibration_time_s (its timed steps, not part of train_time_s),
  backward_layers (layers whose output received an activation gradient in the first training
  step; more than num_layers - min(selected_layers) means backward ran below the lowest adapted
  layer, and the cell logged a warning)
training
  train_steps (optimizer steps completed), planned_steps, train_time_s (training only, summed
  over attempts), probe_time_s, model_load_time_s, step_time_median_s, step_times_s (per
  optimizer step), final_train_loss, eval_loss, attempts
evaluation (filled when benchmarks run)
  benchmarks (list of names that ran), mmlu_acc, mmlu_n, gsm8k_acc, gsm8k_n,
  humaneval_pass1, humaneval_n, eval_time_s (object: benchmark -> seconds), eval_source
  (object: benchmark -> where its data came from)
provenance
  started_at, finished_at (ISO 8601 UTC), host, device, gpu_name (the GPU's name; when requeued
  attempts trained on different hardware, every kind joined by " + ", e.g. "NVIDIA A100 + cpu",
  so that aggregation never takes the cell's time for one machine's), git_sha, git_dirty,
  package_versions (object), slurm (object: job_id, array_job_id, array_task_id, node; empty
  when not under SLURM), config (the resolved cell config)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

ROW_FILENAME = "row.json"
STATUSES = ("ok", "failed", "nan_abort")

# Every row carries these keys; the value may be None where the docstring says so.
REQUIRED_FIELDS = (
    "campaign", "cell_id", "config_hash", "model", "family", "recipe", "variant", "seed",
    "status", "failure_reason", "num_layers", "selected_layers", "layer_scores",
    "trainable_params", "train_steps", "train_time_s", "probe_time_s", "step_time_median_s",
    "final_train_loss", "eval_loss", "started_at", "finished_at", "host", "device", "git_sha",
)
# Evaluation fields default to None for cells that ran no benchmark.
EVAL_FIELDS = (
    "benchmarks", "mmlu_acc", "mmlu_n", "gsm8k_acc", "gsm8k_n", "humaneval_pass1",
    "humaneval_n", "eval_time_s", "eval_source",
)


class InvalidRow(ValueError):
    """A row file that is missing, unreadable, truncated or violates the schema."""


def validate_row(row: Any) -> dict:
    """Return ``row`` if it satisfies the schema, else raise InvalidRow naming the problem."""
    if not isinstance(row, dict):
        raise InvalidRow(f"row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise InvalidRow(f"row is missing fields: {', '.join(missing)}")
    if row["status"] not in STATUSES:
        raise InvalidRow(f"status={row['status']!r} is not one of {STATUSES}")
    if row["cell_id"] != row["config_hash"]:
        raise InvalidRow("cell_id and config_hash differ")
    if row["status"] == "ok":
        if row["failure_reason"] is not None:
            raise InvalidRow("an ok row has a failure_reason")
        if row["recipe"] != "base":
            for key in ("train_time_s", "train_steps", "eval_loss"):
                value = row[key]
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise InvalidRow(f"an ok row needs a finite {key}, got {value!r}")
    elif not row["failure_reason"]:
        raise InvalidRow(f"a {row['status']} row needs a failure_reason")
    return row


def write_row(path: Path, row: dict) -> None:
    """Validate and write ``row`` atomically: readers see the old file, the new one, or none."""
    validate_row(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".row-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(row, handle, indent=1, sort_keys=True, allow_nan=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_row(path: Path) -> dict:
    """Read and validate one row file; InvalidRow names the path on any defect."""
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRow(f"{path}: cannot read row ({exc})") from exc
    try:
        return validate_row(row)
    except InvalidRow as exc:
        raise InvalidRow(f"{path}: {exc}") from exc
