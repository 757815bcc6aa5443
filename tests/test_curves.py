"""Learning-curve reading and the equal-time comparison (aggregate/curves.py), checked against numpy
and scipy on hand-made curves; the time_matched step rule from paired timing and the cost model."""

import numpy as np
import pytest
from scipy import stats as sps

from aletheia_hpc.aggregate.curves import (arm_speedup, best_arm, equal_time_table, loss_at,
                                           time_matched_steps)


def _curve(times, losses, every=2):
    return [{"step": i * every, "train_time_s": t, "eval_loss": l} for i, (t, l) in enumerate(zip(times, losses))]


def test_loss_at_interpolates_as_numpy_and_never_extrapolates():
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.1, 1.0, 12))
    times[0] = 0.0
    losses = 3.0 - np.cumsum(rng.uniform(0, 0.2, 12))
    curve = _curve(times, losses)
    for t in rng.uniform(0, times[-1], 50):
        assert loss_at(curve, t) == pytest.approx(float(np.interp(t, times, losses)), rel=1e-12)
    assert loss_at(curve, times[3]) == pytest.approx(losses[3])
    assert loss_at(curve, 7.0, axis="step") == pytest.approx(float(np.interp(7.0, np.arange(12) * 2, losses)))
    assert loss_at(curve, times[-1] + 1e-6) is None and loss_at([], 1.0) is None


def test_time_matched_steps_come_from_the_paired_timing_else_the_cost_model():
    paired = {"standard": {"ratio_vs_standard": 1.0}, "aletheia": {"ratio_vs_standard": 1.155}}
    assert arm_speedup("aletheia", paired, predicted=1.4) == (1.155, "paired timing")
    assert arm_speedup("drop_backward", paired, predicted=1.4) == (1.4, "cost model")
    with pytest.raises(ValueError, match="neither a paired timing"):
        arm_speedup("drop_backward", paired, predicted=None)
    assert time_matched_steps(200, 1.155) == 231  # floor(200 x 1.155)
    assert time_matched_steps(200, 1.25) == 250  # the paper's compute-matched count
    assert time_matched_steps(24, 1.0) == 24 and time_matched_steps(2, 0.1) == 1


def test_equal_time_table_pairs_seeds_at_shares_of_standards_time():
    rows = []
    truth = {}
    for seed, (s_end, a_end) in enumerate([(10.0, 8.0), (12.0, 9.0), (11.0, 9.5)]):
        std = _curve([0, s_end / 2, s_end], [3.0, 2.0 - 0.1 * seed, 1.5])
        fast = _curve([0, a_end / 2, a_end], [3.0, 2.2, 1.4 + 0.05 * seed])
        rows += [{"status": "ok", "model": "m", "recipe": "standard", "variant": "matched", "seed": seed, "curve": std},
                 {"status": "ok", "model": "m", "recipe": "aletheia", "variant": "matched", "seed": seed, "curve": fast}]
        truth[seed] = (std, fast, s_end)
    table = equal_time_table(rows, fractions=(0.5, 1.0))["m"]
    # at Standard's full time the faster arm has no point: its curve ended before
    assert table[1.0]["aletheia"]["n"] == 0 and table[1.0]["standard"]["delta_vs_reference_mean"] == 0
    deltas = []
    for seed, (std, fast, s_end) in truth.items():
        t = 0.5 * s_end
        ours = np.interp(t, [p["train_time_s"] for p in fast], [p["eval_loss"] for p in fast])
        ref = np.interp(t, [p["train_time_s"] for p in std], [p["eval_loss"] for p in std])
        assert table[0.5]["aletheia"]["per_seed"][seed]["eval_loss"] == pytest.approx(ours)
        deltas.append(ours - ref)
    deltas = np.asarray(deltas)
    half = sps.t.ppf(0.975, 2) * deltas.std(ddof=1) / np.sqrt(3)
    assert table[0.5]["aletheia"]["delta_vs_reference_mean"] == pytest.approx(deltas.mean())
    assert table[0.5]["aletheia"]["delta_ci95"] == pytest.approx([deltas.mean() - half, deltas.mean() + half])
    best = best_arm(table[0.5])
    expected = "aletheia" if deltas.mean() < 0 else "standard"
    every = bool(np.all(deltas <= 0)) if expected == "aletheia" else bool(np.all(deltas >= 0))  # ties count
    assert best["arm"] == expected and best["every_seed"] == every
