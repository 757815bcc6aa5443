"""Paired statistics for arm-vs-Standard pairs (the Aletheia pairs in the paper's tables).

Conventions (they are also written into ``stats.json`` under ``conventions``):

* A *pair* is one Standard run and one run of another arm of the same model and seed (see ``tables``).
* ``time_ratio`` = standard time / arm time; ``speedup_pct`` = (1 - arm / standard) x 100,
  the paper's definition. ``*_mean`` / ``*_sd`` are the mean and the sample SD (ddof=1) over pairs;
  an SD of fewer than 2 values is null.
* Timing test: paired t-test of standard vs arm train time (the differences are
  standard - arm, so t > 0 means the arm was faster), two-sided p-value, df = n - 1. Identical
  to ``scipy.stats.ttest_rel(standard, arm)``.
* Effect size: Cohen's d for paired samples, ``cohens_dz`` = mean(standard - arm) /
  SD(standard - arm) (the "d_z" of the paired differences, not the pooled-SD d_av).
* ``speedup_pct_ci95``: 95% t-interval of the mean per-pair speedup,
  mean +/- t_{0.975, n-1} x SD / sqrt(n).
* ``win_rate``: share of pairs where the arm's train time is strictly lower.
* Hardware: timing figures use only pairs whose two runs ran on the same hardware (GPU name, else
  device type); the others are counted in ``n_pairs_mixed_hardware`` and stay in the quality figures.
* Quality metrics are compared as arm - standard (eval loss in loss units, benchmarks in
  percentage points, accuracies as percent); their paired test is ``ttest_rel(arm, standard)``.
  With a base-model row: ``*_delta_pp`` = fine-tuned - base, and
  ``extra_pp`` = arm delta - standard delta (positive: the arm forgot less).
* n too small: with fewer than 2 pairs the test, d_z and CI are null and ``note`` starts with
  ``"n too small"``; with 0 pairs every figure is null and ``note`` starts with ``"no pairs"``.
* Zero variance: when every paired difference is identical (to a relative 1e-9), the t statistic,
  p-value and d_z are undefined; they are null and ``note`` starts with ``"zero variance"``. The CI
  of a quantity with zero spread is the degenerate interval [mean, mean].
* ``speedup_incl_probe_pct``: the speedup with the arm's probe time added to its train time
  ((1 - (arm + probe) / standard) x 100); arms without a probe count 0 s.
* Holm: ``p_value_holm`` is Holm's step-down adjustment across the arms of a campaign (or of one
  model), per comparison and metric (``arms`` module).
* No NaN or infinity is ever written: undefined values are null.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from aletheia_hpc.evaluation.benchmarks import BENCHMARK_NAMES

ZERO_VARIANCE_RTOL = 1e-9
BENCHMARKS = BENCHMARK_NAMES

CONVENTIONS = {
    "pair": "one Standard run and one run of another arm (status ok) of the same model and seed; "
            "compute_matched runs and Standard runs of other variants are paired with the Standard run of "
            "the matched variant; the paper's tables use the Aletheia pairs",
    "time_ratio": "standard train_time_s / arm train_time_s",
    "speedup_pct": "(1 - arm train_time_s / standard train_time_s) * 100 (the paper's definition)",
    "speedup_pct_from_mean_ratio": "(1 - 1 / ratio_mean) * 100, how the paper derives its per-model speedup",
    "mean_sd": "*_mean and *_sd are the mean and sample SD (ddof=1) over pairs; SD of < 2 values is null",
    "t_test": "paired t-test of standard vs arm train time, differences standard - arm, "
              "two-sided, df = n - 1 (scipy.stats.ttest_rel(standard, arm))",
    "cohens_dz": "Cohen's d for paired samples: mean(standard - arm) / SD(standard - arm)",
    "speedup_pct_ci95": "95% t-interval of the mean per-pair speedup: mean +/- t(0.975, n-1) * SD / sqrt(n)",
    "win_rate": "share of pairs in which the arm's train time is strictly lower",
    "hardware": "a pair whose two runs were timed on different hardware (GPU name, else device type) "
                "is left out of every timing figure and counted in n_pairs_mixed_hardware; its quality "
                "figures are kept",
    "quality": "metric differences are arm - standard; eval loss in loss units, benchmark "
               "accuracies in percent and differences in percentage points (pp); paired test is "
               "ttest_rel(arm, standard)",
    "base_deltas": "*_delta_pp = fine-tuned - base model (pp); extra_pp = arm delta - standard delta "
                   "(positive: the arm forgot less)",
    "n_too_small": "n < 2: t_stat, p_value, cohens_dz and CIs are null, note starts with 'n too small'; "
                   "n = 0: all figures null, note starts with 'no pairs'",
    "zero_variance": "all paired differences identical (relative 1e-9): t_stat, p_value, cohens_dz are "
                     "null and note starts with 'zero variance'; a CI of values with zero spread is "
                     "[mean, mean]",
    "speedup_incl_probe_pct": "(1 - (arm train_time_s + probe_time_s) / standard train_time_s) * 100; no probe: 0 s",
    "holm": "p_value_holm: Holm step-down adjustment across the arms of the campaign (arms.*.overall) or "
            "of one model (arms.*.per_model), within each comparison (timing vs standard, a quality metric "
            "vs standard, a quality metric vs aletheia)",
    "gpu_hours": "from the scheduler's accounting beside each row (accounting.json): elapsed time x "
                 "allocated GPUs, summed over every job that ran the cell (requeued and cancelled runs "
                 "included), so it covers model loading, the probe, training and evaluation; cost.saved = "
                 "Standard - arm over the pairs with both cells accounted on one hardware",
    "speed": "speed[arm][model]: measured speedup = median standard step time / median arm step time, "
             "with a 95% percentile bootstrap CI over the paired rounds or seed pairs; method 'paired' takes "
             "the model's paired timing cell (every arm's steps interleaved in one job, campaign.timing=paired), "
             "'sequential' the training cells' own median step times, seed by seed; predicted_speedup is the "
             "step-cost model's, mean over the arm's rows",
    "stability": "per model, over every two seeds of one probing arm: Jaccard index of the selected "
                 "layer sets and Spearman's rho of the probe scores",
    "per_model": "per_model[model][variant] and per_family[family][variant]; overall covers the "
                 "primary variant (matched when present), by_variant every variant",
}


def finite_or_none(x) -> float | None:
    """A plain float, or None for None / NaN / inf."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(x: np.ndarray) -> float | None:
    return finite_or_none(x.mean()) if x.size else None


def _sd(x: np.ndarray) -> float | None:
    return finite_or_none(x.std(ddof=1)) if x.size >= 2 else None


def _is_constant(x: np.ndarray) -> bool:
    scale = max(1.0, float(np.max(np.abs(x)))) if x.size else 1.0
    return bool(x.size and float(np.ptp(x)) <= ZERO_VARIANCE_RTOL * scale)


def mean_ci95(x: np.ndarray) -> list[float] | None:
    """95% t-interval of the mean of ``x``; None for n < 2, [mean, mean] for zero spread."""
    x = np.asarray(x, dtype=float)
    n = x.size
    if n < 2:
        return None
    mean = float(x.mean())
    if _is_constant(x):
        return [mean, mean]
    half = float(sps.t.ppf(0.975, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return [mean - half, mean + half]


def paired_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired t-test of a vs b (differences a - b) with Cohen's d_z; undefined cases -> None + note."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    d = a - b
    n = int(d.size)
    out = {"t_stat": None, "df": None, "p_value": None, "cohens_dz": None, "note": None}
    if n == 0:
        out["note"] = "no pairs"
        return out
    if n < 2:
        out["note"] = f"n too small: {n} pair; a paired test needs at least 2"
        return out
    out["df"] = n - 1
    if _is_constant(d):
        out["note"] = (f"zero variance: all {n} paired differences equal {float(d[0]):.6g}; "
                       "t, p and d_z are undefined (null)")
        return out
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    t = mean / (sd / math.sqrt(n))
    out["t_stat"] = finite_or_none(t)
    out["p_value"] = finite_or_none(2.0 * sps.t.sf(abs(t), n - 1))
    out["cohens_dz"] = finite_or_none(mean / sd)
    return out


def timing_stats(std_time: np.ndarray, arm_time: np.ndarray, probe_time: np.ndarray | None = None) -> dict:
    """The timing block of one group of pairs (see the module docstring). ``probe_time``: the arm's
    probe seconds per pair (missing = no probe), for the speedup with the probe counted."""
    std_time = np.asarray(std_time, dtype=float)
    arm_time = np.asarray(arm_time, dtype=float)
    n = int(std_time.size)
    probe = np.zeros(n) if probe_time is None else np.nan_to_num(np.asarray(probe_time, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        speedup_incl_probe = (1.0 - (arm_time + probe) / std_time) * 100.0
    ratio = std_time / arm_time if n else std_time
    speedup = (1.0 - arm_time / std_time) * 100.0 if n else std_time
    saved = std_time - arm_time
    test = paired_test(std_time, arm_time)
    ratio_mean = _mean(ratio)
    out = {
        "n_pairs": n,
        "n_pairs_mixed_hardware": 0,
        "std_time_s_mean": _mean(std_time), "std_time_s_sd": _sd(std_time),
        "arm_time_s_mean": _mean(arm_time), "arm_time_s_sd": _sd(arm_time),
        "time_saved_s_mean": _mean(saved), "time_saved_s_sd": _sd(saved),
        "ratio_mean": ratio_mean, "ratio_sd": _sd(ratio),
        "speedup_pct_mean": _mean(speedup), "speedup_pct_sd": _sd(speedup),
        "speedup_pct_ci95": mean_ci95(speedup),
        "speedup_pct_min": finite_or_none(speedup.min()) if n else None,
        "speedup_pct_max": finite_or_none(speedup.max()) if n else None,
        "speedup_pct_from_mean_ratio": finite_or_none((1.0 - 1.0 / ratio_mean) * 100.0) if ratio_mean else None,
        "t_stat": test["t_stat"], "df": test["df"], "p_value": test["p_value"],
        "cohens_dz": test["cohens_dz"],
        "win_rate": finite_or_none(np.mean(arm_time < std_time)) if n else None,
        "probe_time_s_mean": _mean(probe),
        "speedup_incl_probe_pct_mean": _mean(speedup_incl_probe), "speedup_incl_probe_pct_sd": _sd(speedup_incl_probe),
        "speedup_incl_probe_pct_ci95": mean_ci95(speedup_incl_probe),
        "note": test["note"],
    }
    return out


# at most this many resampled values per side of one bootstrap (resamples x pairs): campaigns
# have a few seeds or timed rounds (4000 resamples); the 100,000-row aggregation bench has
# thousands of pairs per model, where 4000 resamples would cost seconds per arm
MEDIAN_BOOTSTRAP_DRAWS = 400_000


def median_ratio_ci(reference, arm, resamples: int = 4000, seed: int = 0
                    ) -> tuple[float | None, float | None, float | None]:
    """median(reference) / median(arm) and its 95 % percentile bootstrap interval, resampling the
    paired positions (a timed round, or a seed's two cells) together; (point, None, None) for
    fewer than 2 pairs, (None, None, None) for none. Beyond MEDIAN_BOOTSTRAP_DRAWS / resamples
    pairs the number of resamples shrinks to keep the work bounded (never below 200: with that
    many pairs the interval is narrow, and its ends move by well under its width)."""
    reference, arm = np.asarray(reference, dtype=float), np.asarray(arm, dtype=float)
    if reference.shape != arm.shape:
        raise ValueError(f"paired times differ in length: {reference.size} and {arm.size}")
    if not reference.size:
        return None, None, None
    point = finite_or_none(np.median(reference) / np.median(arm))
    if reference.size < 2:
        return point, None, None
    resamples = min(resamples, max(200, MEDIAN_BOOTSTRAP_DRAWS // reference.size))
    picks = np.random.default_rng(seed).integers(0, reference.size, size=(resamples, reference.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = np.median(reference[picks], axis=1) / np.median(arm[picks], axis=1)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return point, finite_or_none(lo), finite_or_none(hi)


def metric_stats(std: np.ndarray, arm: np.ndarray, base: np.ndarray | None = None,
                 scale: float = 1.0, unit: str = "loss", ref: str = "std") -> dict | None:
    """Quality block of one metric: reference / arm means, arm - reference difference, base deltas.

    ``std`` (the reference: Standard, or another arm named by ``ref``, which prefixes its fields),
    ``arm`` and ``base`` are raw row values (benchmarks as fractions); ``scale`` = 100 turns them
    into percent. Pairs where either value is missing are left out; None if none is left.
    """
    std = np.asarray(std, dtype=float) * scale
    arm = np.asarray(arm, dtype=float) * scale
    keep = np.isfinite(std) & np.isfinite(arm)
    if not keep.any():
        return None
    std, arm = std[keep], arm[keep]
    diff = arm - std
    test = paired_test(arm, std)
    out = {
        "unit": unit, "n": int(keep.sum()),
        f"{ref}_mean": _mean(std), f"{ref}_sd": _sd(std), "arm_mean": _mean(arm), "arm_sd": _sd(arm),
        "diff_mean": _mean(diff), "diff_sd": _sd(diff), "diff_ci95": mean_ci95(diff),
        "t_stat": test["t_stat"], "df": test["df"], "p_value": test["p_value"], "note": test["note"],
    }
    if base is not None:
        base = np.asarray(base, dtype=float)[keep] * scale
        has = np.isfinite(base)
        if has.any():
            std_delta = std[has] - base[has]
            arm_delta = arm[has] - base[has]
            extra = arm_delta - std_delta
            out.update({
                "n_with_base": int(has.sum()), "base_mean": _mean(base[has]),
                "std_delta_pp_mean": _mean(std_delta), "std_delta_pp_sd": _sd(std_delta),
                "arm_delta_pp_mean": _mean(arm_delta), "arm_delta_pp_sd": _sd(arm_delta),
                "extra_pp_mean": _mean(extra), "extra_pp_sd": _sd(extra),
                "extra_pp_ci95": mean_ci95(extra),
            })
    return out


def holm(p_values: list) -> list:
    """Holm's step-down adjustment of a family of p-values (None stays None and is not counted):
    the i-th smallest of m becomes max over j <= i of min(1, (m - j) p_(j)), j from 0."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list = [None] * len(p_values)
    running = 0.0
    for j, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - j) * p))
        adjusted[i] = running
    return adjusted


QUALITY_METRICS = (("eval_loss", 1.0, "loss"),) + tuple((b, 100.0, "percent; differences in pp") for b in BENCHMARKS)


class PairBlocks:
    """The columns of a pairs frame as numpy arrays, so that the statistics of any group of pairs
    (a model, an arm, a family) are a cheap fancy-index: ``block(positions)``."""

    def __init__(self, pairs):
        self.std_time = pairs["std_train_time_s"].to_numpy(float)
        self.arm_time = pairs["arm_train_time_s"].to_numpy(float)
        self.probe_time = pairs["arm_probe_time_s"].to_numpy(float)
        self.same_hardware = pairs["same_hardware"].to_numpy(bool)
        self.cols = {}
        for metric, _, _ in QUALITY_METRICS:
            if metric == "eval_loss":
                std, arm, base = pairs["std_eval_loss"], pairs["arm_eval_loss"], None
            else:  # pair tables hold percent; metric_stats scales, so hand it fractions back
                std = pairs[f"std_{metric}_pct"] / 100.0
                arm = pairs[f"arm_{metric}_pct"] / 100.0
                base = pairs[f"base_{metric}_pct"] / 100.0
            self.cols[metric] = (std.to_numpy(float), arm.to_numpy(float),
                                 None if base is None else base.to_numpy(float))

    def block(self, idx: np.ndarray) -> dict:
        timed = idx[self.same_hardware[idx]]
        out = timing_stats(self.std_time[timed], self.arm_time[timed], self.probe_time[timed])
        mixed = int(idx.size - timed.size)
        if mixed:
            out["n_pairs_mixed_hardware"] = mixed
            out["note"] = "; ".join(filter(None, [
                out["note"], f"{mixed} pair(s) timed Standard and the arm on different hardware: left out of "
                             "the timing figures, kept in the quality ones"]))
        quality = {}
        for metric, scale, unit in QUALITY_METRICS:
            std, arm, base = self.cols[metric]
            q = metric_stats(std[idx], arm[idx], None if base is None else base[idx], scale=scale, unit=unit)
            if q is not None:
                quality[metric] = q
        out["quality"] = quality
        return out


def empty_timing_stats(note: str) -> dict:
    """A timing block for a group without pairs: every figure null, ``note`` says why."""
    out = timing_stats(np.empty(0), np.empty(0))
    out["note"] = note
    return out


def clean_json(value):
    """Recursively replace NaN / inf by None and numpy scalars by Python ones (for strict JSON)."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(v) is int or type(v) is str for v in value):  # e.g. long seed lists
            return list(value)
        return [clean_json(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return finite_or_none(value)
    return value


def _effect(per_seed: np.ndarray, definition: str) -> dict:
    """Mean of an effect over seeds with its 95% t-interval; a CI that rests on nothing is no CI."""
    n = int(per_seed.size)
    out = {"definition": definition, "n_seeds": n, "mean": _mean(per_seed), "sd": _sd(per_seed),
           "ci95": None, "note": None}
    if n < 2:
        out["note"] = f"n too small: {n} seed; a CI needs at least 2"
    elif _is_constant(per_seed):
        out["note"] = (f"zero variance: the effect is {float(per_seed[0]):.6g} in all {n} seeds; the interval "
                       "is degenerate (no spread to estimate), not a finding of certainty")
    else:
        out["ci95"] = mean_ci95(per_seed)
    return out


def factorial_effects(values: dict[tuple[str, str, object], float], factors: tuple[str, str],
                      levels: tuple[list[str], list[str]]) -> dict:
    """Main effects and interaction of a 2x2 design replicated over seeds.

    ``values``: (level of factor A, level of factor B, seed) -> the measured value. Per seed that has
    all four combinations: main effect of A = mean over B of y(a2, .) - y(a1, .), of B likewise, and the
    interaction = ((y(a2,b2) - y(a2,b1)) - (y(a1,b2) - y(a1,b1))) / 2; each is then averaged over seeds
    with a 95% t-interval (``_effect``). Seeds missing a combination are listed and left out."""
    (a, b), (la, lb) = factors, levels
    seeds = sorted({s for (_, _, s) in values}, key=str)
    complete = [s for s in seeds if all((x, y, s) in values for x in la for y in lb)]
    y = {(x, z): np.array([values[(x, z, s)] for s in complete], dtype=float) for x in la for z in lb}
    a1, a2 = la
    b1, b2 = lb
    main_a = (y[(a2, b1)] + y[(a2, b2)]) / 2 - (y[(a1, b1)] + y[(a1, b2)]) / 2
    main_b = (y[(a1, b2)] + y[(a2, b2)]) / 2 - (y[(a1, b1)] + y[(a2, b1)]) / 2
    inter = ((y[(a2, b2)] - y[(a2, b1)]) - (y[(a1, b2)] - y[(a1, b1)])) / 2
    return {
        "factors": [a, b], "levels": {a: list(la), b: list(lb)}, "seeds": complete,
        "seeds_incomplete": [s for s in seeds if s not in complete],
        "cell_means": [{a: x, b: z, "n": int(y[(x, z)].size), "mean": _mean(y[(x, z)]), "sd": _sd(y[(x, z)])}
                       for x in la for z in lb],
        "effects": {
            a: _effect(main_a, f"mean over {b} of y({a}={a2}) - y({a}={a1})"),
            b: _effect(main_b, f"mean over {a} of y({b}={b2}) - y({b}={b1})"),
            f"{a} x {b}": _effect(inter, f"half the difference of {b}'s effect at {a}={a2} and at {a}={a1}"),
        },
    }
