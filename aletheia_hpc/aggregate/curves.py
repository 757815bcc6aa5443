"""Learning curves (row.curve: [{step, train_time_s, eval_loss}], train.eval_every > 0) and the
equal-time comparison (issue 31): each arm's held-out loss read off its curve at a share of the
Standard run's training time of the same model and seed, paired over seeds; and the time_matched
step rule, the steps an arm's speed buys within Standard's training time."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from aletheia_hpc.aggregate.stats import mean_ci95
from aletheia_hpc.row import arm_name

TIME_FRACTIONS = (0.25, 0.5, 1.0)  # shares of Standard's training time the equal-time table reads


def loss_at(curve: Sequence[dict], value: float, axis: str = "train_time_s") -> float | None:
    """The curve's eval loss at ``value`` of ``axis`` (train_time_s or step), linear between its
    points; None outside them (a curve is never extrapolated: an arm that stopped earlier has no loss
    at a later time)."""
    if not curve:
        return None
    xs = np.asarray([float(p[axis]) for p in curve])
    if value < xs[0] or value > xs[-1]:
        return None
    return float(np.interp(value, xs, [float(p["eval_loss"]) for p in curve]))


def time_matched_steps(standard_steps: int, speedup: float) -> int:
    """The optimizer steps an arm ``speedup`` x faster per step than Standard takes in Standard's
    training time of ``standard_steps`` steps (rounded down, at least one). ``speedup``: the paired
    timing cell's ratio_vs_standard where there is one, else the step-cost model's predicted_speedup."""
    if not speedup > 0 or standard_steps < 1:
        raise ValueError(f"time_matched_steps needs standard_steps >= 1 and speedup > 0, got "
                         f"{standard_steps}, {speedup}")
    return max(1, math.floor(standard_steps * speedup + 1e-9))


def arm_speedup(arm: str, paired: dict | None, predicted: float | None) -> tuple[float, str]:
    """The speed the time_matched rule uses for ``arm``, and where it comes from: the paired timing
    (``paired``: a timing row's paired_timing) if it timed the arm, else the cost model's prediction."""
    if paired and arm in paired:
        return float(paired[arm]["ratio_vs_standard"]), "paired timing"
    if predicted is None:
        raise ValueError(f"arm {arm!r} has neither a paired timing nor a predicted_speedup")
    return float(predicted), "cost model"


def equal_time_table(rows: Iterable[dict], reference: str = "standard",
                     fractions: Sequence[float] = TIME_FRACTIONS) -> dict:
    """{model: {fraction: {arm: {n, eval_loss_mean, delta_vs_reference_mean, delta_ci95, per_seed}}}}:
    each arm's loss read off its curve at ``fraction`` x the reference run's training time of the
    same model and seed, and its paired difference from the reference's own loss there."""
    by = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("curve"):
            arm = row.get("arm") or arm_name(row["recipe"], row.get("variant", "matched"))
            by.setdefault(row["model"], {}).setdefault(arm, {})[row["seed"]] = row["curve"]
    out = {}
    for model, arms in sorted(by.items()):
        ref = arms.get(reference, {})
        out[model] = {}
        for fraction in fractions:
            table = {}
            for arm, curves in sorted(arms.items()):
                per_seed = {}
                for seed, curve in sorted(curves.items()):
                    if seed not in ref:
                        continue
                    t = fraction * float(ref[seed][-1]["train_time_s"])
                    loss, ref_loss = loss_at(curve, t), loss_at(ref[seed], t)
                    if loss is not None and ref_loss is not None:
                        per_seed[seed] = {"eval_loss": loss, "delta": loss - ref_loss}
                deltas = np.asarray([v["delta"] for v in per_seed.values()])
                table[arm] = {"n": len(per_seed),
                              "eval_loss_mean": (float(np.mean([v["eval_loss"] for v in per_seed.values()]))
                                                 if per_seed else None),
                              "delta_vs_reference_mean": float(deltas.mean()) if deltas.size else None,
                              "delta_ci95": mean_ci95(deltas), "per_seed": per_seed}
            out[model][fraction] = table
    return out


def best_arm(table: dict) -> dict:
    """Of one (model, fraction) table: the arm with the lowest mean loss, and whether it is lowest in
    every seed all arms share."""
    arms = {a: v for a, v in table.items() if v["n"]}
    if not arms:
        return {"arm": None, "every_seed": False}
    best = min(arms, key=lambda a: arms[a]["eval_loss_mean"])
    seeds = set.intersection(*(set(v["per_seed"]) for v in arms.values()))
    every = bool(seeds) and all(
        all(arms[best]["per_seed"][s]["eval_loss"] <= arms[a]["per_seed"][s]["eval_loss"] for a in arms)
        for s in seeds)
    return {"arm": best, "every_seed": every}
