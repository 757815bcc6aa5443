"""Is a benchmark score meaningful, and do two cells differ question by question? Pure functions.

Degenerate scores (per benchmark and model): a warning when one answer takes at least
:data:`DOMINANT_SHARE` of a cell's answers (e.g. "A" to 99 of 100 MMLU questions), or when its
accuracy lies inside the central 95 % binomial interval of the chance baseline (a uniform guess:
1/4 for MMLU, 0 for generated answers) or of the majority-answer baseline (always giving the most
common gold answer). Such a number may be exactly right and still say nothing about the model.

Paired statistics on the same questions: McNemar's exact test (two-sided binomial test on the
discordant questions) and a paired bootstrap confidence interval of the accuracy difference
(questions resampled with replacement, both cells' answers kept together). Pairing on questions
is far more powerful than comparing a handful of per-seed means.

Samples are the per-question records of ``samples/<benchmark>.jsonl``: ``id``, ``correct`` and
``choice`` (multiple choice) or ``prediction``/``generation``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

DOMINANT_SHARE = 0.9
LEVEL = 0.95


def binomial_interval(p: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Central ``level`` interval of the accuracy k/n when k ~ Binomial(n, p): the smallest k_lo
    with P(K <= k_lo) >= (1-level)/2 and the smallest k_hi with P(K <= k_hi) >= (1+level)/2,
    divided by n (the quantiles scipy.stats.binom.ppf gives)."""
    if n <= 0:
        raise ValueError("n must be positive")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p} is not a probability")
    lower_q, upper_q = (1 - level) / 2, (1 + level) / 2
    cumulative, k_lo, k_hi = 0.0, None, n
    for k in range(n + 1):
        cumulative += _binom_pmf(k, n, p)
        if k_lo is None and cumulative >= lower_q - 1e-12:
            k_lo = k
        if cumulative >= upper_q - 1e-12:
            k_hi = k
            break
    return (k_lo if k_lo is not None else n) / n, k_hi / n


def _binom_pmf(k: int, n: int, p: float) -> float:
    if p == 0.0:
        return 1.0 if k == 0 else 0.0
    if p == 1.0:
        return 1.0 if k == n else 0.0
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * math.log(p) + (n - k) * math.log1p(-p))


def answer_of(sample: dict):
    """The answer a sample records: its choice, else its extracted prediction, else its text."""
    for key in ("choice", "prediction", "generation"):
        if key in sample:
            return sample[key]
    return None


def degenerate_flags(samples: Sequence[dict], chance: float | None,
                     golds: Sequence | None = None) -> dict:
    """Flags for one cell's samples of one benchmark.

    ``chance``: the accuracy of a uniform guess (None: no such baseline). ``golds``: the gold
    answers (multiple choice), for the majority-answer baseline. Returns ``n``, ``accuracy``,
    ``dominant_answer``/``dominant_share``, the baselines with their intervals, and ``warnings``
    (empty when the score looks meaningful).
    """
    n = len(samples)
    out: dict = {"n": n, "accuracy": None, "dominant_answer": None, "dominant_share": None,
                 "chance": chance, "chance_interval": None, "majority_baseline": None,
                 "majority_interval": None, "warnings": []}
    if n == 0:
        return out
    accuracy = sum(bool(s.get("correct")) for s in samples) / n
    answer, count = Counter(_hashable(answer_of(s)) for s in samples).most_common(1)[0]
    out.update(accuracy=accuracy, dominant_answer=answer, dominant_share=count / n)
    if count / n >= DOMINANT_SHARE and n > 1:
        out["warnings"].append(f"one answer ({answer!r}) is {count} of {n} answers")
    if chance is not None:
        lo, hi = binomial_interval(chance, n)
        out["chance_interval"] = [lo, hi]
        if lo <= accuracy <= hi:
            out["warnings"].append(f"accuracy {accuracy:.1%} lies inside the 95% interval of chance "
                                   f"({chance:.0%}: [{lo:.1%}, {hi:.1%}] for n={n})")
    if golds:
        majority = Counter(golds).most_common(1)[0][1] / len(golds)
        lo, hi = binomial_interval(majority, n)
        out.update(majority_baseline=majority, majority_interval=[lo, hi])
        if lo <= accuracy <= hi and not (chance is not None and out["chance_interval"][0] <= accuracy
                                         <= out["chance_interval"][1]):
            out["warnings"].append(f"accuracy {accuracy:.1%} lies inside the 95% interval of always "
                                   f"giving the most common answer ({majority:.0%}: [{lo:.1%}, {hi:.1%}])")
    return out


def _hashable(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def paired_outcomes(a: Iterable[dict], b: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of the questions both sample lists hold, matched by ``id`` (a's order)."""
    b_by_id = {s["id"]: bool(s.get("correct")) for s in b}
    ids = [s for s in a if s["id"] in b_by_id]
    return (np.array([bool(s.get("correct")) for s in ids], dtype=bool),
            np.array([b_by_id[s["id"]] for s in ids], dtype=bool))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """McNemar's exact test of paired correctness: ``only_a`` (a right, b wrong), ``only_b``, and
    the two-sided p-value min(1, 2 P(X <= min(only_a, only_b))) for X ~ Binomial(only_a+only_b, 1/2)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("a and b must pair the same questions")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    if discordant == 0:
        p = 1.0
    else:
        tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2**discordant
        p = min(1.0, 2 * tail)
    return {"n": int(a.size), "only_a": only_a, "only_b": only_b, "p_value": p}


def paired_bootstrap_ci(a: Sequence[bool], b: Sequence[bool], *, n_boot: int = 10_000,
                        level: float = LEVEL, seed: int = 0) -> dict:
    """Accuracy difference b - a on paired questions with a percentile bootstrap CI."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("a and b must pair the same, non-empty set of questions")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"n": int(diff.size), "diff": float(diff.mean()), "ci": [float(lo), float(hi)],
            "level": level, "n_boot": n_boot}


def compare_cells(a: Sequence[dict], b: Sequence[dict], *, seed: int = 0) -> dict | None:
    """McNemar and the bootstrap CI of b - a for two cells' samples of one benchmark."""
    x, y = paired_outcomes(a, b)
    if x.size == 0:
        return None
    return {**mcnemar_exact(x, y), "diff": paired_bootstrap_ci(x, y, seed=seed)}


def campaign_quality(cells: Sequence[dict], samples: dict, chance: dict,
                     pairs: Sequence[tuple[str, str]] = ()) -> dict:
    """The ``quality_flags`` section of stats.json.

    ``cells``: dicts with cell_id, model, arm (recipe[@variant]; one per ok cell), seed.
    ``samples``: cell_id -> benchmark -> samples. ``chance``: benchmark -> chance accuracy (or
    None). ``pairs``: (standard cell_id, arm cell_id) of the same model and seed. A cell's ``eval_source``
    (benchmark -> source) feeds ``sources`` (benchmark -> source -> number of cells).

    ``flags``: one entry per benchmark, model and arm whose cells have samples: mean accuracy,
    how many cells carry a warning, and the distinct warnings. ``paired``: per model, arm and
    benchmark, the arm vs Standard over the questions of all seed pairs together (each question
    of each seed is one pair) and per seed pair.
    """
    groups: dict[tuple, list] = {}
    for cell in cells:
        for bench, bench_samples in (samples.get(cell["cell_id"]) or {}).items():
            groups.setdefault((bench, cell["model"], cell["arm"]), []).append(bench_samples)
    flags = []
    for (bench, model, arm), cell_samples in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        per_cell = []
        for s in cell_samples:
            golds = [x["answer"] for x in s if "answer" in x] or None
            per_cell.append(degenerate_flags(s, chance.get(bench), golds))
        accuracies = [f["accuracy"] for f in per_cell if f["accuracy"] is not None]
        warnings = list(dict.fromkeys(w for f in per_cell for w in f["warnings"]))
        flags.append({"benchmark": bench, "model": model, "arm": arm, "n_cells": len(per_cell),
                      "n_questions": per_cell[0]["n"],
                      "accuracy_mean": float(np.mean(accuracies)) if accuracies else None,
                      "n_cells_flagged": sum(bool(f["warnings"]) for f in per_cell),
                      "flagged": any(f["warnings"] for f in per_cell), "warnings": warnings})

    by_id = {c["cell_id"]: c for c in cells}
    paired: dict = {}
    pooled: dict = {}
    for std_id, arm_id in pairs:
        if std_id not in by_id or arm_id not in by_id:
            continue
        cell = by_id[arm_id]
        for bench, arm_samples in (samples.get(arm_id) or {}).items():
            std_samples = (samples.get(std_id) or {}).get(bench)
            if not std_samples:
                continue
            entry = paired.setdefault(cell["model"], {}).setdefault(cell["arm"], {}).setdefault(
                bench, {"per_seed": {}})
            entry["per_seed"][str(cell.get("seed"))] = compare_cells(std_samples, arm_samples)
            x, y = paired_outcomes(std_samples, arm_samples)
            acc = pooled.setdefault((cell["model"], cell["arm"], bench), ([], []))
            acc[0].append(x)
            acc[1].append(y)
    for (model, arm, bench), (xs, ys) in pooled.items():
        x, y = np.concatenate(xs), np.concatenate(ys)
        if x.size:
            paired[model][arm][bench]["pooled"] = {**mcnemar_exact(x, y), "diff": paired_bootstrap_ci(x, y)}
    sources: dict = {}
    for cell in cells:
        for bench, source in (cell.get("eval_source") or {}).items():
            counts = sources.setdefault(bench, {})
            counts[str(source)] = counts.get(str(source), 0) + 1
    return {"flags": flags, "paired": paired, "sources": sources,
            "conventions": {
                "dominant_share": DOMINANT_SHARE, "level": LEVEL,
                "paired_diff": "arm - Standard accuracy on the same questions (fraction)",
                "mcnemar": "exact two-sided; only_a = Standard right and the arm wrong, only_b the reverse"}}
