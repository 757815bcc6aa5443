"""Paired statistics for Standard-vs-Aletheia pairs.

Conventions (they are also written into ``stats.json`` under ``conventions``):

* A *pair* is one Standard run and one Aletheia run of the same model and seed (see ``tables``).
* ``time_ratio`` = standard time / aletheia time; ``speedup_pct`` = (1 - aletheia / standard) x 100,
  the paper's definition. ``*_mean`` / ``*_sd`` are the mean and the sample SD (ddof=1) over pairs;
  an SD of fewer than 2 values is null.
* Timing test: paired t-test of standard vs aletheia train time (the differences are
  standard - aletheia, so t > 0 means Aletheia was faster), two-sided p-value, df = n - 1. Identical
  to ``scipy.stats.ttest_rel(standard, aletheia)``.
* Effect size: Cohen's d for paired samples, ``cohens_dz`` = mean(standard - aletheia) /
  SD(standard - aletheia) (the "d_z" of the paired differences, not the pooled-SD d_av).
* ``speedup_pct_ci95``: 95% t-interval of the mean per-pair speedup,
  mean +/- t_{0.975, n-1} x SD / sqrt(n).
* ``win_rate``: share of pairs where Aletheia's train time is strictly lower.
* Hardware: timing figures use only pairs whose two runs ran on the same hardware (GPU name, else
  device type); the others are counted in ``n_pairs_mixed_hardware`` and stay in the quality figures.
* Quality metrics are compared as aletheia - standard (eval loss in loss units, benchmarks in
  percentage points, accuracies as percent); their paired test is ``ttest_rel(aletheia, standard)``.
  With a base-model row: ``*_delta_pp`` = fine-tuned - base, and
  ``extra_pp`` = aletheia delta - standard delta (positive: Aletheia forgot less).
* n too small: with fewer than 2 pairs the test, d_z and CI are null and ``note`` starts with
  ``"n too small"``; with 0 pairs every figure is null and ``note`` starts with ``"no pairs"``.
* Zero variance: when every paired difference is identical (to a relative 1e-9), the t statistic,
  p-value and d_z are undefined; they are null and ``note`` starts with ``"zero variance"``. The CI
  of a quantity with zero spread is the degenerate interval [mean, mean].
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
    "pair": "one Standard and one Aletheia run (status ok) of the same model and seed; "
            "compute_matched Aletheia runs are paired with the Standard run of the matched variant",
    "time_ratio": "standard train_time_s / aletheia train_time_s",
    "speedup_pct": "(1 - aletheia train_time_s / standard train_time_s) * 100 (the paper's definition)",
    "speedup_pct_from_mean_ratio": "(1 - 1 / ratio_mean) * 100, how the paper derives its per-model speedup",
    "mean_sd": "*_mean and *_sd are the mean and sample SD (ddof=1) over pairs; SD of < 2 values is null",
    "t_test": "paired t-test of standard vs aletheia train time, differences standard - aletheia, "
              "two-sided, df = n - 1 (scipy.stats.ttest_rel(standard, aletheia))",
    "cohens_dz": "Cohen's d for paired samples: mean(standard - aletheia) / SD(standard - aletheia)",
    "speedup_pct_ci95": "95% t-interval of the mean per-pair speedup: mean +/- t(0.975, n-1) * SD / sqrt(n)",
    "win_rate": "share of pairs in which the Aletheia train time is strictly lower",
    "hardware": "a pair whose two runs were timed on different hardware (GPU name, else device type) "
                "is left out of every timing figure and counted in n_pairs_mixed_hardware; its quality "
                "figures are kept",
    "quality": "metric differences are aletheia - standard; eval loss in loss units, benchmark "
               "accuracies in percent and differences in percentage points (pp); paired test is "
               "ttest_rel(aletheia, standard)",
    "base_deltas": "*_delta_pp = fine-tuned - base model (pp); extra_pp = aletheia delta - standard delta "
                   "(positive: Aletheia forgot less)",
    "n_too_small": "n < 2: t_stat, p_value, cohens_dz and CIs are null, note starts with 'n too small'; "
                   "n = 0: all figures null, note starts with 'no pairs'",
    "zero_variance": "all paired differences identical (relative 1e-9): t_stat, p_value, cohens_dz are "
                     "null and note starts with 'zero variance'; a CI of values with zero spread is "
                     "[mean, mean]",
    "per_model": "per_model[model][variant] and per_family[family][variant]; overall covers the "
                 "primary variant (matched when present), by_variant every variant",
}


def _finite(x) -> float | None:
    """A plain float, or None for None / NaN / inf."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(x: np.ndarray) -> float | None:
    return _finite(x.mean()) if x.size else None


def _sd(x: np.ndarray) -> float | None:
    return _finite(x.std(ddof=1)) if x.size >= 2 else None


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
    out["t_stat"] = _finite(t)
    out["p_value"] = _finite(2.0 * sps.t.sf(abs(t), n - 1))
    out["cohens_dz"] = _finite(mean / sd)
    return out


def timing_stats(std_time: np.ndarray, ale_time: np.ndarray) -> dict:
    """The timing block of one group of pairs (see the module docstring)."""
    std_time = np.asarray(std_time, dtype=float)
    ale_time = np.asarray(ale_time, dtype=float)
    n = int(std_time.size)
    ratio = std_time / ale_time if n else std_time
    speedup = (1.0 - ale_time / std_time) * 100.0 if n else std_time
    saved = std_time - ale_time
    test = paired_test(std_time, ale_time)
    ratio_mean = _mean(ratio)
    out = {
        "n_pairs": n,
        "n_pairs_mixed_hardware": 0,
        "std_time_s_mean": _mean(std_time), "std_time_s_sd": _sd(std_time),
        "ale_time_s_mean": _mean(ale_time), "ale_time_s_sd": _sd(ale_time),
        "time_saved_s_mean": _mean(saved), "time_saved_s_sd": _sd(saved),
        "ratio_mean": ratio_mean, "ratio_sd": _sd(ratio),
        "speedup_pct_mean": _mean(speedup), "speedup_pct_sd": _sd(speedup),
        "speedup_pct_ci95": mean_ci95(speedup),
        "speedup_pct_min": _finite(speedup.min()) if n else None,
        "speedup_pct_max": _finite(speedup.max()) if n else None,
        "speedup_pct_from_mean_ratio": _finite((1.0 - 1.0 / ratio_mean) * 100.0) if ratio_mean else None,
        "t_stat": test["t_stat"], "df": test["df"], "p_value": test["p_value"],
        "cohens_dz": test["cohens_dz"],
        "win_rate": _finite(np.mean(ale_time < std_time)) if n else None,
        "note": test["note"],
    }
    return out


def metric_stats(std: np.ndarray, ale: np.ndarray, base: np.ndarray | None = None,
                 scale: float = 1.0, unit: str = "loss") -> dict | None:
    """Quality block of one metric: std / ale means, aletheia - standard difference, base deltas.

    ``std``, ``ale`` and ``base`` are raw row values (benchmarks as fractions); ``scale`` = 100 turns
    them into percent. Pairs where either value is missing are left out; None if none is left.
    """
    std = np.asarray(std, dtype=float) * scale
    ale = np.asarray(ale, dtype=float) * scale
    keep = np.isfinite(std) & np.isfinite(ale)
    if not keep.any():
        return None
    std, ale = std[keep], ale[keep]
    diff = ale - std
    test = paired_test(ale, std)
    out = {
        "unit": unit, "n": int(keep.sum()),
        "std_mean": _mean(std), "std_sd": _sd(std), "ale_mean": _mean(ale), "ale_sd": _sd(ale),
        "diff_mean": _mean(diff), "diff_sd": _sd(diff), "diff_ci95": mean_ci95(diff),
        "t_stat": test["t_stat"], "df": test["df"], "p_value": test["p_value"], "note": test["note"],
    }
    if base is not None:
        base = np.asarray(base, dtype=float)[keep] * scale
        has = np.isfinite(base)
        if has.any():
            std_delta = std[has] - base[has]
            ale_delta = ale[has] - base[has]
            extra = ale_delta - std_delta
            out.update({
                "n_with_base": int(has.sum()), "base_mean": _mean(base[has]),
                "std_delta_pp_mean": _mean(std_delta), "std_delta_pp_sd": _sd(std_delta),
                "ale_delta_pp_mean": _mean(ale_delta), "ale_delta_pp_sd": _sd(ale_delta),
                "extra_pp_mean": _mean(extra), "extra_pp_sd": _sd(extra),
                "extra_pp_ci95": mean_ci95(extra),
            })
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
        return _finite(value)
    return value
