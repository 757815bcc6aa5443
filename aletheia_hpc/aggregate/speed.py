"""Measured speed per arm and model beside the step-cost model's prediction.

``stats.json["speed"][arm][model]`` (every arm but standard)
    method              ``paired``: from the model's paired timing cell (campaign.timing=paired):
                        that job's interleaved step times of standard and the arm, round by round;
                        ``sequential``: from the training cells' own median step times
                        (step_time_median_s), the arm's cell of each seed beside the standard cell
                        of that seed (pairs on one hardware only, as in every timing figure)
    speedup             median standard step time / median arm step time over the rounds
                        (paired) or over the seeds' cell medians (sequential)
    speedup_ci95        95 % percentile bootstrap of that ratio, resampling the rounds (paired)
                        or the seed pairs (sequential) together (stats.median_ratio_ci); null
                        for fewer than 2
    n                   timed rounds (paired) or seed pairs (sequential)
    predicted_speedup   the step-cost model's prediction of what was measured: paired, the timing
                        cell's own for the set it timed (its calibration, on its node; else the
                        training rows' mean); sequential, the mean over the arm's ok training rows
                        of the model (Row.predicted_speedup); null when nothing was calibrated
    cells_predicted_speedup  the mean over the arm's ok training rows (paired only): a rule that
                        reads its calibration (cost_aware) may pick other layers in another job
    predicted_minus_measured  predicted_speedup - speedup
    layers              the timing cell's selection for the arm (paired only)
The paired figure is used whenever the model has an ok timing row holding both the arm and
standard; the sequential one otherwise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from aletheia_hpc.row import TIMING_RECIPE

from .arms import arm_order
from .stats import finite_or_none, median_ratio_ci
from .tables import STANDARD, latest_ok_training_runs


def paired_timings(rows: list[dict]) -> dict[str, dict]:
    """{model: paired_timing} of the latest finished ok timing row of each model."""
    timing = [r for r in rows if r.get("recipe") == TIMING_RECIPE and r.get("status") == "ok"
              and isinstance(r.get("paired_timing"), dict)]
    latest = {}
    for row in sorted(timing, key=lambda r: (r.get("finished_at") or "", r["cell_id"])):
        latest[row["model"]] = row["paired_timing"]
    return latest


def _figure(method: str, reference, arm, predicted: float | None, **extra) -> dict:
    point, lo, hi = median_ratio_ci(reference, arm)
    return {"method": method, "speedup": point, "speedup_ci95": None if lo is None else [lo, hi],
            "n": int(len(reference)), "predicted_speedup": predicted,
            "predicted_minus_measured": finite_or_none(predicted - point) if predicted is not None and point else None,
            **extra}


def speed_stats(runs: pd.DataFrame, pairs: pd.DataFrame, timings: dict[str, dict]) -> dict:
    """``stats.json["speed"]`` (module docstring). ``timings``: paired_timings of the rows."""
    train = latest_ok_training_runs(runs)
    predicted = (train.assign(p=pd.to_numeric(train["predicted_speedup"], errors="coerce"))
                 .groupby(["arm", "model"])["p"].mean().to_dict()) if len(train) else {}
    step = dict(zip(runs["cell_id"], pd.to_numeric(runs["step_time_median_s"], errors="coerce")))
    out: dict[str, dict] = {}
    same = pairs[pairs["same_hardware"].astype(bool)]
    by_arm_model = same.groupby(["arm", "model"], sort=False).indices
    pair_models: dict[str, set] = {}
    for arm, model in set(zip(pairs["arm"].tolist(), pairs["model"].tolist())):
        pair_models.setdefault(arm, set()).add(model)
    std_cells, arm_cells = same["std_cell_id"].to_numpy(), same["arm_cell_id"].to_numpy()
    arms = set(pair_models) | {a for t in timings.values() for a in t}
    for arm in arm_order(arms - {STANDARD}):
        entry = {}
        models = pair_models.get(arm, set()) | {m for m, t in timings.items() if arm in t}
        for model in sorted(models, key=str):
            guess = finite_or_none(predicted.get((arm, model)))
            timing = timings.get(model) or {}
            if arm in timing and STANDARD in timing:
                own = finite_or_none(timing[arm].get("predicted_speedup"))
                entry[model] = _figure("paired", timing[STANDARD]["step_times_s"], timing[arm]["step_times_s"],
                                       guess if own is None else own, cells_predicted_speedup=guess,
                                       layers=timing[arm].get("layers"))
                continue
            idx = by_arm_model.get((arm, model), [])
            std = np.array([step.get(c, np.nan) for c in std_cells[idx]], dtype=float)
            other = np.array([step.get(c, np.nan) for c in arm_cells[idx]], dtype=float)
            keep = np.isfinite(std) & np.isfinite(other) & (other > 0)
            if keep.any():
                entry[model] = _figure("sequential", std[keep], other[keep], guess)
        if entry:
            out[arm] = entry
    return out
