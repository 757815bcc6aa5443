"""The campaign's cost in the unit operators pay: GPU-hours from the scheduler's accounting.

A cell's GPU-hours are read from the accounting.json beside its row (row.ACCOUNTING_FILENAME, kept
by ``status`` on a SLURM cluster): elapsed time x allocated GPUs of every job that ran the cell,
requeued and cancelled runs included, so they cover model loading, the probe, training and
evaluation. A local run has no accounting; its cells count as unaccounted.

``stats.json["cost"]``
    n_cells, n_cells_accounted, gpu_hours (over every accounted cell)
    per_arm     {arm: {cells, cells_accounted, gpu_hours}} over every row's cell, any status
                (a failed cell's hours were spent too); gpu_hours null when no cell is accounted
    per_model   {model: {arm: the same}}
    saved       {arm: {overall: saving, per_model: {model: saving}}} for every arm paired with
                Standard (the pairs of tables.pairs_frame): saving = n_pairs (both cells accounted,
                on one hardware), n_pairs_unaccounted, n_pairs_mixed_hardware (left out, as in the
                timing figures), standard_gpu_hours, arm_gpu_hours, saved_gpu_hours
                (standard - arm), saved_pct (of standard)
"""

from __future__ import annotations

import pandas as pd

from .arms import arm_order


def _spent(runs: pd.DataFrame) -> dict:
    hours = runs["gpu_hours"]
    accounted = int(hours.notna().sum())
    return {"cells": int(len(runs)), "cells_accounted": accounted,
            "gpu_hours": float(hours.sum()) if accounted else None}


def _spent_by(runs: pd.DataFrame, keys: str | list[str]) -> dict:
    """_spent of every group of ``keys`` (a column, or a list of them: tuple keys), in one groupby:
    {key: {cells, cells_accounted, gpu_hours}}."""
    grouped = runs.groupby(keys, sort=False)["gpu_hours"].agg(["size", "count", "sum"])
    return {key: {"cells": int(size), "cells_accounted": int(count), "gpu_hours": float(total) if count else None}
            for key, size, count, total in zip(grouped.index, grouped["size"], grouped["count"], grouped["sum"])}


def _saving(pairs: pd.DataFrame) -> dict:
    accounted = (pairs["std_gpu_hours"].notna() & pairs["arm_gpu_hours"].notna()).to_numpy(bool)
    same = pairs["same_hardware"].astype(bool).to_numpy()
    used = pairs[accounted & same]
    std, arm = float(used["std_gpu_hours"].sum()), float(used["arm_gpu_hours"].sum())
    n = int(len(used))
    return {"n_pairs": n, "n_pairs_unaccounted": int((~accounted).sum()),
            "n_pairs_mixed_hardware": int((accounted & ~same).sum()),
            "standard_gpu_hours": std if n else None, "arm_gpu_hours": arm if n else None,
            "saved_gpu_hours": std - arm if n else None,
            "saved_pct": 100.0 * (std - arm) / std if n and std > 0 else None}


def cost_stats(runs: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """``stats.json["cost"]`` (module docstring) from the runs frame (its ``gpu_hours``) and the
    arm/Standard pairs (``std_gpu_hours``, ``arm_gpu_hours``)."""
    by_model = runs.groupby("model", sort=False).indices
    by_arm = pairs.groupby("arm", sort=False).indices if len(pairs) else {}
    saved = {}
    for arm in arm_order(by_arm):
        mine = pairs.iloc[by_arm[arm]]
        saved[arm] = {"overall": _saving(mine),
                      "per_model": {m: _saving(g) for m, g in mine.groupby("model", sort=False)}}
    total = _spent(runs)
    by_arm_spent = _spent_by(runs, "arm") if len(runs) else {}
    per_arm = {arm: by_arm_spent[arm] for arm in arm_order(by_arm_spent)}
    spent = _spent_by(runs, ["model", "arm"]) if len(runs) else {}
    per_model = {m: {arm: spent[(m, arm)] for arm in arm_order({a for mm, a in spent if mm == m})} for m in by_model}
    return {"n_cells": total["cells"], "n_cells_accounted": total["cells_accounted"],
            "gpu_hours": total["gpu_hours"], "per_arm": per_arm, "per_model": per_model, "saved": saved}
