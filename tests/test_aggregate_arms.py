"""Studies (aggregate/arms.py): every arm against Standard, controls against Aletheia, Holm across
arms, ranking stability across seeds; checked against scipy and statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from aletheia_hpc.aggregate import aggregate_campaign, aggregate_rows
from aletheia_hpc.aggregate.stats import holm
from aletheia_hpc.aggregate.tables import runs_frame
from tests.test_aggregate import make_row, scipy_ci, write_campaign
from tests.test_aggregate_report import PNG_SIGNATURE

MODEL, L = "qwen2.5-0.5b", 8
SEEDS = (42, 123, 999)
# per arm: train times and eval losses over the three seeds, and the layers it adapted
ARMS = {
    "standard": ([130.0, 128.0, 133.0], [0.90, 0.92, 0.91], list(range(L))),
    "aletheia": ([100.0, 97.0, 104.0], [0.95, 0.96, 0.94], [0, 1, 2, 3]),
    "random_k": ([99.0, 101.0, 95.0], [1.01, 0.99, 1.03], [1, 3, 5, 7]),
    "bottom_k": ([96.0, 98.0, 97.5], [1.10, 1.05, 1.12], [4, 5, 6, 7]),
}
PROBE = {"norm": "tensor_sum", "loss_tokens": "all", "batch_size": 1, "batches": 5, "mode": "chunked"}
SCORES = {42: [8, 7, 6, 5, 4, 3, 2, 1], 123: [8, 6, 7, 5, 4, 3, 1, 2], 999: [7, 8, 5, 6, 3, 4, 2, 1]}


def study_rows() -> list[dict]:
    rows = []
    for arm, (times, losses, layers) in ARMS.items():
        for k, seed in enumerate(SEEDS):
            probe = {} if arm == "standard" else {"layer_scores": [float(x) for x in SCORES[seed]],
                                                  "probe_time_s": 2.0, "probe": PROBE}
            chosen = {} if arm == "aletheia" else {"selected_layers": layers}
            rows.append(make_row(MODEL, arm, seed, time_s=times[k], eval_loss=losses[k], num_layers=L,
                                 **probe, **chosen))
    return rows  # Aletheia's layers: make_row picks the top half of its scores


@pytest.fixture(scope="module")
def stats():
    return aggregate_rows(study_rows(), report=False).stats


def test_every_arm_is_paired_with_standard_and_matches_scipy(stats):
    std_t, std_l, _ = ARMS["standard"]
    assert list(stats["arms"]) == ["aletheia", "bottom_k", "random_k"]
    for arm in ("aletheia", "random_k", "bottom_k"):
        times, losses, _ = ARMS[arm]
        o = stats["arms"][arm]["overall"]
        speedup = (1 - np.array(times) / np.array(std_t)) * 100
        assert o["n_pairs"] == 3
        assert o["speedup_pct_mean"] == pytest.approx(speedup.mean())
        assert o["speedup_pct_ci95"] == pytest.approx(list(scipy_ci(speedup)))
        assert o["p_value"] == pytest.approx(sps.ttest_rel(std_t, times).pvalue)
        q = o["quality"]["eval_loss"]
        assert q["diff_mean"] == pytest.approx(np.mean(np.array(losses) - np.array(std_l)))
        assert q["p_value"] == pytest.approx(sps.ttest_rel(losses, std_l).pvalue)
        # with the probe's 2 s per run counted
        incl = (1 - (np.array(times) + 2.0) / np.array(std_t)) * 100
        assert o["speedup_incl_probe_pct_mean"] == pytest.approx(incl.mean())
        assert stats["arms"][arm]["per_model"][MODEL]["speedup_pct_mean"] == pytest.approx(speedup.mean())
    # the paper's headline is still the Aletheia comparison alone
    assert stats["overall"]["n_pairs"] == 3
    assert stats["overall"]["speedup_pct_mean"] == stats["arms"]["aletheia"]["overall"]["speedup_pct_mean"]


def test_holm_across_arms_equals_statsmodels(stats):
    arms = ("aletheia", "bottom_k", "random_k")
    for key in ("timing", "eval_loss"):
        blocks = [stats["arms"][a]["overall"] if key == "timing" else stats["arms"][a]["overall"]["quality"][key]
                  for a in arms]
        raw = [b["p_value"] for b in blocks]
        expected = multipletests(raw, method="holm")[1]
        assert [b["p_value_holm"] for b in blocks] == pytest.approx(list(expected))
    raw = [0.01, 0.04, None, 0.03, 0.2]
    present = [p for p in raw if p is not None]
    ours = [p for p in holm(raw) if p is not None]
    assert ours == pytest.approx(list(multipletests(present, method="holm")[1]))
    assert holm(raw)[2] is None


def test_controls_are_compared_with_aletheia_at_equal_k(stats):
    ale_l = np.array(ARMS["aletheia"][1])
    for arm in ("random_k", "bottom_k"):
        vs = stats["arms"][arm]["vs_aletheia"]
        assert vs["aletheia_arm"] == "aletheia" and vs["overall"]["n_pairs"] == 3
        q = vs["overall"]["quality"]["eval_loss"]
        diff = np.array(ARMS[arm][1]) - ale_l
        assert q["aletheia_mean"] == pytest.approx(ale_l.mean()) and q["diff_mean"] == pytest.approx(diff.mean())
        assert q["diff_ci95"] == pytest.approx(list(scipy_ci(diff)))
        assert q["p_value"] == pytest.approx(sps.ttest_rel(ARMS[arm][1], ale_l).pvalue)
    raw = [stats["arms"][a]["vs_aletheia"]["overall"]["quality"]["eval_loss"]["p_value"] for a in ("bottom_k", "random_k")]
    adjusted = [stats["arms"][a]["vs_aletheia"]["overall"]["quality"]["eval_loss"]["p_value_holm"]
                for a in ("bottom_k", "random_k")]
    assert adjusted == pytest.approx(list(multipletests(raw, method="holm")[1]))
    assert stats["arms"]["aletheia"]["vs_aletheia"] is None


def test_a_control_with_another_layer_count_is_not_compared_at_equal_k():
    rows = study_rows()
    for r in rows:
        if r["recipe"] == "random_k" and r["seed"] == 42:
            r["selected_layers"] = [1, 3, 5]
    vs = aggregate_rows(rows, report=False).stats["arms"]["random_k"]["vs_aletheia"]["overall"]
    assert vs["n_pairs"] == 2 and vs["n_unequal_k"] == 1


def test_cost_aware_picks_its_own_k_and_is_compared_with_aletheia_at_the_same_budget():
    cost_losses = [0.97, 0.93, 0.99]

    def rows_with(cost_pct):
        rows = study_rows()
        for r in rows:
            if r["recipe"] == "aletheia":
                r["config"] = {"recipe": {"layers": "top", "layer_pct": 50.0}}
        for k, seed in enumerate(SEEDS):  # three layers where aletheia has four: the rule's own choice
            rows.append(make_row(MODEL, "cost_aware", seed, time_s=80.0, eval_loss=cost_losses[k], num_layers=L,
                                 selected_layers=[5, 6, 7], layer_scores=[float(x) for x in SCORES[seed]],
                                 config={"recipe": {"layers": "cost_aware", "layer_pct": cost_pct}}))
        return rows

    runs = runs_frame(rows_with(50.0))
    cost = runs[runs["recipe"] == "cost_aware"]
    assert cost["layer_rule"].tolist() == ["cost_aware"] * 3 and cost["layer_pct"].tolist() == [50.0] * 3
    assert runs[runs["recipe"] == "standard"]["layer_rule"].isna().all()  # a row without its config
    odd = runs_frame([{**rows_with(50.0)[0], "config": {"recipe": "not a mapping"}}])
    assert odd["layer_rule"].isna().all() and odd["layer_pct"].isna().all()
    result = aggregate_rows(rows_with(50.0), report=False)
    vs = result.stats["arms"]["cost_aware"]["vs_aletheia"]["overall"]
    assert vs["n_pairs"] == 3 and vs["n_own_k"] == 3 and vs["n_unequal_k"] == 0
    diff = np.array(cost_losses) - np.array(ARMS["aletheia"][1])
    q = vs["quality"]["eval_loss"]
    assert q["diff_mean"] == pytest.approx(diff.mean()) and q["diff_ci95"] == pytest.approx(list(scipy_ci(diff)))
    # the equal-k controls are unchanged by it
    assert result.stats["arms"]["random_k"]["vs_aletheia"]["overall"]["n_own_k"] == 0
    # at another layer budget the unequal k is no longer the rule's choice within Aletheia's budget
    vs = aggregate_rows(rows_with(25.0), report=False).stats["arms"]["cost_aware"]["vs_aletheia"]["overall"]
    assert vs["n_pairs"] == 0 and vs["n_unequal_k"] == 3


def test_ranking_stability_is_jaccard_and_spearman_over_seed_pairs(stats):
    s = stats["stability"][MODEL]
    assert s["arm"] == "aletheia" and s["n_seeds"] == 3
    chosen = {seed: set(sorted(range(L), key=lambda i: -SCORES[seed][i])[: L // 2]) for seed in SEEDS}
    pairs = [(a, b) for i, a in enumerate(SEEDS) for b in SEEDS[i + 1:]]
    jac = [len(chosen[a] & chosen[b]) / len(chosen[a] | chosen[b]) for a, b in pairs]
    rho = [sps.spearmanr(SCORES[a], SCORES[b]).statistic for a, b in pairs]
    assert s["jaccard_mean"] == pytest.approx(np.mean(jac)) and s["jaccard_min"] == pytest.approx(min(jac))
    assert s["spearman_mean"] == pytest.approx(np.mean(rho)) and s["spearman_min"] == pytest.approx(min(rho))
    assert [p["seeds"] for p in s["pairs"]] == [list(p) for p in pairs]


def test_arm_names_come_from_recipe_and_variant():
    rows = study_rows()
    for r in rows:
        if r["recipe"] == "bottom_k":
            r["variant"] = "budget25"
            r.pop("arm", None)
    stats = aggregate_rows(rows, report=False).stats
    assert "bottom_k@budget25" in stats["arms"]
    # no Standard run in variant budget25: paired with the matched Standard of the same seed
    assert stats["arms"]["bottom_k@budget25"]["standard_variant"] == "matched"
    assert stats["arms"]["bottom_k@budget25"]["overall"]["n_pairs"] == 3


def test_report_has_the_controls_table_stability_and_pareto_figure(tmp_path):
    write_campaign(tmp_path, study_rows(), campaign="study")
    result = aggregate_campaign(tmp_path, "study")
    report = result.report_md.read_text()
    controls = report.split("## Every arm against Standard LoRA")[1].split("\n## ")[0]
    random_k = next(line for line in controls.splitlines() if line.startswith("| random_k | all "))
    o = result.stats["arms"]["random_k"]["overall"]
    assert f"{o['speedup_pct_mean']:+.1f}" in random_k and f"{o['speedup_incl_probe_pct_mean']:+.1f}" in random_k
    vs = result.stats["arms"]["random_k"]["vs_aletheia"]["overall"]["quality"]["eval_loss"]
    assert f"{vs['diff_mean']:+.4f}" in random_k
    s = result.stats["stability"][MODEL]
    assert "## Ranking stability across seeds" in report and f"{s['jaccard_mean']:.3f}" in report
    assert result.figures["arms_pareto"].read_bytes().startswith(PNG_SIGNATURE)
    assert "figures/arms_speed_quality.png" in report
    assert ("What the probe computed: 9 run(s): score = sum over probe batches and over the layer's parameter "
            "tensors of each tensor's gradient L2 norm (the paper authors' aletheia-lora definition); loss over "
            "every token; 5 batch(es) of 1 sequence(s); mode chunked.") in report


def test_compute_matched_figure_4_needs_base_and_benchmarks(tmp_path):
    rows = [make_row(MODEL, "base", 0, mmlu=0.50, gsm8k=0.30)]
    for k, seed in enumerate(SEEDS):
        rows.append(make_row(MODEL, "standard", seed, time_s=130.0 + k, mmlu=0.48 + k / 100, gsm8k=0.31))
        rows.append(make_row(MODEL, "aletheia", seed, time_s=100.0 - k, mmlu=0.49, gsm8k=0.29 + k / 100))
        rows.append(make_row(MODEL, "aletheia", seed, variant="compute_matched", time_s=125.0 - k,
                             mmlu=0.495 - k / 200, gsm8k=0.30))
    write_campaign(tmp_path, rows, campaign="cm")
    result = aggregate_campaign(tmp_path, "cm")
    assert result.figures["compute_matched_deltas"].read_bytes().startswith(PNG_SIGNATURE)
    assert "figures/compute_matched_deltas.png" in result.report_md.read_text()
    cm = result.stats["compute_matched"]["per_model"][MODEL]["quality"]["mmlu"]
    assert cm["arm_delta_pp_mean"] == pytest.approx(np.mean([(0.495 - k / 200 - 0.50) * 100 for k in range(3)]))
