"""Aggregation statistics and tables, checked against independent scipy computations."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from aletheia_hpc.aggregate import aggregate_campaign, aggregate_rows, config_name, summary_table
from aletheia_hpc.aggregate.figures import FIGURE_FILES
from aletheia_hpc.aggregate.paper import PAPER_REFERENCE_DIR
from aletheia_hpc.row import write_row

CAMPAIGN = "camp"


# --------------------------------------------------------------------------------------- helpers

def make_row(model: str, recipe: str, seed, *, variant: str = "matched", status: str = "ok",
             time_s: float | None = 100.0, eval_loss: float | None = 1.0, family: str = "qwen2",
             num_layers: int = 8, mmlu: float | None = None, gsm8k: float | None = None,
             humaneval: float | None = None, layer_scores: list | None = None,
             campaign: str = CAMPAIGN, **extra) -> dict:
    """A schema-valid row dict (see aletheia_hpc/row.py); base rows carry no training fields."""
    cell_id = f"{model}__{recipe}__{variant}__s{seed}"
    failed = status != "ok"
    if recipe == "aletheia":
        if layer_scores is None:
            layer_scores = [float(num_layers - i) for i in range(num_layers)]
        selected = sorted(sorted(range(num_layers), key=lambda i: -layer_scores[i])[: num_layers // 2])
    else:
        layer_scores = None
        selected = list(range(num_layers)) if recipe == "standard" else []
    training = recipe != "base"
    row = {
        "campaign": campaign, "cell_id": cell_id, "config_hash": cell_id, "model": model,
        "family": family, "recipe": recipe, "variant": variant, "seed": seed, "status": status,
        "failure_reason": "loss became NaN at step 3 (fp16)" if failed else None,
        "nan_step": 3 if status == "nan_abort" else None,
        "num_layers": num_layers, "selected_layers": selected, "layer_scores": layer_scores,
        "trainable_params": 1000 * len(selected) if training else None,
        "train_steps": (250 if variant == "compute_matched" else 200) if training and not failed else None,
        "planned_steps": 250 if variant == "compute_matched" else 200,
        "train_time_s": time_s if training and not failed else None,
        "probe_time_s": 2.0 if recipe == "aletheia" else None,
        "step_time_median_s": 0.5 if training else None,
        "final_train_loss": 0.9 if training and not failed else None,
        "eval_loss": eval_loss if training and not failed else None,
        "attempts": 1,
        "benchmarks": [b for b, v in (("mmlu", mmlu), ("gsm8k", gsm8k), ("humaneval", humaneval))
                       if v is not None],
        "mmlu_acc": mmlu, "mmlu_n": 200 if mmlu is not None else None,
        "gsm8k_acc": gsm8k, "gsm8k_n": 200 if gsm8k is not None else None,
        "humaneval_pass1": humaneval, "humaneval_n": 164 if humaneval is not None else None,
        "started_at": "2025-03-01T10:00:00+00:00", "finished_at": "2025-03-01T11:00:00+00:00",
        "host": "gpu-node-07", "device": "cuda:0", "gpu_name": "NVIDIA A100-SXM4-64GB",
        "git_sha": "a1b2c3d", "git_dirty": False,
        "package_versions": {"torch": "2.4.1", "peft": "0.21.0"},
        "slurm": {"job_id": "77", "array_job_id": "77", "array_task_id": "3", "node": "gpu-node-07"},
    }
    row.update(extra)
    return row


def write_campaign(results_dir: Path, rows: list[dict], campaign: str = CAMPAIGN) -> Path:
    """Write rows as <results_dir>/<campaign>/cells/<cell_id>/row.json with the real write_row."""
    for row in rows:
        write_row(results_dir / campaign / "cells" / row["cell_id"] / "row.json", row)
    return results_dir / campaign


def pair_rows(model: str, seeds, std_times, arm_times, **kw) -> list[dict]:
    rows = []
    for seed, st, at in zip(seeds, std_times, arm_times):
        rows.append(make_row(model, "standard", seed, time_s=float(st), **kw))
        rows.append(make_row(model, "aletheia", seed, time_s=float(at), **kw))
    return rows


def strict_json(path: Path) -> dict:
    """Parse JSON refusing NaN / Infinity (Python's json accepts them by default)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def paper_speed_table() -> list[dict]:
    with open(PAPER_REFERENCE_DIR / "campaign1_speed.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def scipy_ci(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=float)
    half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


# ------------------------------------------------------------------------------------ the paper

def test_paper_ratios_reproduce_headline(tmp_path):
    """The paper's ten per-model ratios give mean speedup 23.1 % and range 15.8-27.8 %."""
    table = paper_speed_table()
    assert len(table) == 10
    rows = []
    for entry in table:
        model = config_name(entry["paper_model"])
        ratio = float(entry["time_ratio"])
        ale = [90.0, 100.0, 115.0]
        rows += pair_rows(model, [42, 123, 999], [ratio * a for a in ale], ale)
    write_campaign(tmp_path, rows)
    result = aggregate_campaign(tmp_path, CAMPAIGN, expected_cells=60, figures=False)
    overall = result.stats["overall"]
    assert overall["n_pairs"] == 30 and overall["n_models"] == 10
    assert round(overall["speedup_pct_mean"], 1) == 23.1
    low, high = overall["per_model_speedup_pct_range"]
    assert (round(low, 1), round(high, 1)) == (15.8, 27.8)
    assert overall["ratio_mean"] == pytest.approx(1.305, abs=1e-9)
    assert overall["win_rate"] == 1.0 and overall["model_win_rate"] == 1.0
    for entry in table:  # per model: the paper's derived speedup column
        block = result.stats["per_model"][config_name(entry["paper_model"])]["matched"]
        assert block["ratio_mean"] == pytest.approx(float(entry["time_ratio"]))
        assert round(block["speedup_pct_from_mean_ratio"], 1) == float(entry["speedup_pct"])
    # the 30-pair paired t-test against scipy
    std = result.pairs["std_train_time_s"].to_numpy()
    ale = result.pairs["arm_train_time_s"].to_numpy()
    ref = sps.ttest_rel(std, ale)
    assert overall["t_stat"] == pytest.approx(ref.statistic, rel=1e-10)
    assert overall["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert len(result.master) == 30
    assert len(pd.read_csv(result.results_master_csv)) == 30
    assert result.partial is False


# ----------------------------------------------------------------------------- stats vs scipy

def random_campaign(seed: int = 7, models=("qwen2.5-0.5b", "mistral-7b", "gpt-j-6b"), n_seeds: int = 4):
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    families = {"qwen2.5-0.5b": "qwen2", "mistral-7b": "mistral", "gpt-j-6b": "gptj"}
    for model in models:
        std = rng.uniform(100, 200, n_seeds)
        ale = std * rng.uniform(0.7, 0.95, n_seeds)
        loss_std = rng.uniform(0.8, 1.2, n_seeds)
        loss_ale = loss_std + rng.normal(0.02, 0.03, n_seeds)
        truth[model] = (std, ale, loss_std, loss_ale)
        for k in range(n_seeds):
            rows.append(make_row(model, "standard", k, time_s=float(std[k]), eval_loss=float(loss_std[k]),
                                 family=families.get(model, "x")))
            rows.append(make_row(model, "aletheia", k, time_s=float(ale[k]), eval_loss=float(loss_ale[k]),
                                 family=families.get(model, "x")))
    return rows, truth


def test_overall_and_per_model_stats_match_scipy():
    rows, truth = random_campaign()
    result = aggregate_rows(rows, report=False)
    std = np.concatenate([t[0] for t in truth.values()])
    ale = np.concatenate([t[1] for t in truth.values()])
    o = result.stats["overall"]
    ref = sps.ttest_rel(std, ale)
    speedup = (1 - ale / std) * 100
    d = std - ale
    assert o["n_pairs"] == 12 and o["df"] == 11
    assert o["t_stat"] == pytest.approx(ref.statistic, rel=1e-10)
    assert o["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert o["cohens_dz"] == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-10)
    assert o["speedup_pct_mean"] == pytest.approx(speedup.mean(), rel=1e-12)
    assert o["speedup_pct_sd"] == pytest.approx(speedup.std(ddof=1), rel=1e-10)
    assert o["speedup_pct_ci95"] == pytest.approx(list(scipy_ci(speedup)), rel=1e-10)
    lo, hi = sps.t.interval(0.95, len(speedup) - 1, loc=speedup.mean(), scale=sps.sem(speedup))
    assert o["speedup_pct_ci95"] == pytest.approx([lo, hi], rel=1e-10)
    assert o["ratio_mean"] == pytest.approx((std / ale).mean(), rel=1e-12)
    assert o["win_rate"] == 1.0
    for model, (s, a, ls, la) in truth.items():
        b = result.stats["per_model"][model]["matched"]
        r = sps.ttest_rel(s, a)
        assert b["n_pairs"] == 4
        assert b["t_stat"] == pytest.approx(r.statistic, rel=1e-10)
        assert b["p_value"] == pytest.approx(r.pvalue, rel=1e-8)
        assert b["std_time_s_mean"] == pytest.approx(s.mean()) and b["std_time_s_sd"] == pytest.approx(s.std(ddof=1))
        assert b["arm_time_s_sd"] == pytest.approx(a.std(ddof=1))
        assert b["speedup_pct_ci95"] == pytest.approx(list(scipy_ci((1 - a / s) * 100)), rel=1e-10)
        q = b["quality"]["eval_loss"]
        rq = sps.ttest_rel(la, ls)
        assert q["diff_mean"] == pytest.approx((la - ls).mean(), rel=1e-10)
        assert q["t_stat"] == pytest.approx(rq.statistic, rel=1e-10)
        assert q["p_value"] == pytest.approx(rq.pvalue, rel=1e-8)
        assert q["diff_ci95"] == pytest.approx(list(scipy_ci(la - ls)), rel=1e-9)
    # a family with one model has exactly that model's statistics
    fam = result.stats["per_family"]["mistral"]["matched"]
    assert fam["models"] == ["mistral-7b"]
    assert fam["t_stat"] == pytest.approx(result.stats["per_model"]["mistral-7b"]["matched"]["t_stat"])


def test_pairs_timed_on_different_hardware_leave_timing_and_stay_in_quality(tmp_path):
    rows = pair_rows("qwen2.5-7b", [1, 2, 3, 4], [100, 110, 120, 130], [80, 85, 90, 95])
    h100 = "NVIDIA H100 80GB HBM3"
    for row in rows:
        if row["seed"] == 4 and row["recipe"] == "aletheia":
            row["gpu_name"], row["eval_loss"] = h100, 1.5  # seed 4's Aletheia run landed on another GPU type
        if row["seed"] == 3 and row["recipe"] == "standard":
            row["device"], row["gpu_name"] = "cpu", None  # and seed 3's Standard run on a CPU
    result = aggregate_campaign(write_campaign(tmp_path, rows).parent, CAMPAIGN)
    block = result.stats["per_model"]["qwen2.5-7b"]["matched"]
    assert block["n_pairs"] == 2 and block["n_pairs_mixed_hardware"] == 2
    assert block["std_time_s_mean"] == pytest.approx(105.0) and block["arm_time_s_mean"] == pytest.approx(82.5)
    assert block["t_stat"] == pytest.approx(sps.ttest_rel([100, 110], [80, 85]).statistic)
    assert "2 pair(s) timed Standard and the arm on different hardware" in block["note"]
    assert block["quality"]["eval_loss"]["n"] == 4  # quality does not depend on the clock
    assert block["quality"]["eval_loss"]["arm_mean"] == pytest.approx((1 + 1 + 1 + 1.5) / 4)
    assert result.stats["overall"]["n_pairs_mixed_hardware"] == 2
    pairs = pd.read_csv(tmp_path / CAMPAIGN / "pairs.csv").set_index("seed")
    assert pairs["same_hardware"].to_dict() == {1: True, 2: True, 3: False, 4: False}
    assert pairs.loc[4, "arm_hardware"] == h100 and pairs.loc[3, "std_hardware"] == "cpu"
    report = (tmp_path / CAMPAIGN / "REPORT.md").read_text()
    assert "## Pairs timed on different hardware" in report and f"| {h100} |" in report


def test_pairs_on_one_hardware_report_no_mixed_pairs(tmp_path):
    result = aggregate_campaign(write_campaign(tmp_path, pair_rows("qwen2.5-7b", [1, 2], [100, 110], [80, 85])).parent,
                                CAMPAIGN)
    assert result.stats["overall"]["n_pairs"] == 2 and result.stats["overall"]["n_pairs_mixed_hardware"] == 0
    assert "different hardware" not in (tmp_path / CAMPAIGN / "REPORT.md").read_text().split("## Conventions")[0]


def test_per_family_pools_models():
    rows, truth = random_campaign(models=("qwen2.5-0.5b", "qwen2.5-7b", "mistral-7b"))
    result = aggregate_rows(rows, report=False)
    fam = result.stats["per_family"]["x"]["matched"]  # random_campaign gives unknown models family "x"
    assert fam["models"] == ["qwen2.5-7b"]
    q = result.stats["per_family"]["qwen2"]["matched"]
    assert q["models"] == ["qwen2.5-0.5b"]
    rows = [dict(r, family="qwen2") if r["model"] == "qwen2.5-7b" else r for r in rows]
    result = aggregate_rows(rows, report=False)
    q = result.stats["per_family"]["qwen2"]["matched"]
    s = np.concatenate([truth["qwen2.5-0.5b"][0], truth["qwen2.5-7b"][0]])
    a = np.concatenate([truth["qwen2.5-0.5b"][1], truth["qwen2.5-7b"][1]])
    assert q["n_pairs"] == 8 and q["models"] == ["qwen2.5-0.5b", "qwen2.5-7b"]
    assert q["t_stat"] == pytest.approx(sps.ttest_rel(s, a).statistic, rel=1e-10)


# ------------------------------------------------------------------------------ edge cases

def test_single_pair_is_n_too_small(tmp_path):
    write_campaign(tmp_path, pair_rows("qwen2.5-0.5b", [42], [130.0], [100.0]))
    result = aggregate_campaign(tmp_path, CAMPAIGN, figures=False)
    data = strict_json(result.stats_json)
    for block in (data["overall"], data["per_model"]["qwen2.5-0.5b"]["matched"]):
        assert block["n_pairs"] == 1
        assert block["t_stat"] is None and block["p_value"] is None and block["cohens_dz"] is None
        assert block["speedup_pct_ci95"] is None and block["speedup_pct_sd"] is None
        assert block["note"].startswith("n too small")
        assert block["speedup_pct_mean"] == pytest.approx((1 - 100 / 130) * 100)
        assert block["win_rate"] == 1.0
    assert "n too small" in result.report_md.read_text()


def test_zero_variance_gives_null_t_and_d(tmp_path):
    rows = pair_rows("qwen2.5-0.5b", [42, 123, 999], [120.0] * 3, [90.0] * 3)
    rows += pair_rows("mistral-7b", [42, 123, 999], [200.0] * 3, [150.0] * 3, family="mistral")
    write_campaign(tmp_path, rows)
    result = aggregate_campaign(tmp_path, CAMPAIGN, figures=False)
    data = strict_json(result.stats_json)  # no NaN / Infinity anywhere
    block = data["per_model"]["qwen2.5-0.5b"]["matched"]
    assert block["t_stat"] is None and block["p_value"] is None and block["cohens_dz"] is None
    assert block["note"].startswith("zero variance")
    assert block["speedup_pct_ci95"] == [pytest.approx(25.0), pytest.approx(25.0)]
    assert block["speedup_pct_sd"] == pytest.approx(0.0)
    # overall: differences 30 and 50 s differ, so the test is defined there ...
    overall = data["overall"]
    ref = sps.ttest_rel([120.0] * 3 + [200.0] * 3, [90.0] * 3 + [150.0] * 3)
    assert overall["t_stat"] == pytest.approx(ref.statistic) and overall["note"] is None
    # ... while the identical speedups (25 % each) give a degenerate CI, not NaN
    assert overall["speedup_pct_ci95"] == [pytest.approx(25.0), pytest.approx(25.0)]
    # eval loss identical on both recipes: its test is null with the same note
    assert data["overall"]["quality"]["eval_loss"]["note"].startswith("zero variance")


def test_failed_seed_is_kept_in_runs_and_left_out_of_pairs(tmp_path):
    rows = pair_rows("tinyllama-1.1b", [42, 123], [130.0, 131.0], [100.0, 99.0], family="llama")
    rows.append(make_row("tinyllama-1.1b", "standard", 999, time_s=129.0, family="llama"))
    rows.append(make_row("tinyllama-1.1b", "aletheia", 999, status="nan_abort", family="llama"))
    rows.append(make_row("tinyllama-1.1b", "aletheia", 7, status="failed", family="llama",
                         failure_reason="CUDA out of memory"))
    write_campaign(tmp_path, rows)
    result = aggregate_campaign(tmp_path, CAMPAIGN, figures=False)
    runs = pd.read_csv(result.runs_csv)
    assert len(runs) == 7
    bad = runs[runs["status"] != "ok"].set_index("seed")
    assert bad.loc[999, "status"] == "nan_abort"
    assert bad.loc[999, "failure_reason"] == "loss became NaN at step 3 (fp16)"
    assert bad.loc[999, "nan_step"] == 3
    assert bad.loc[7, "failure_reason"] == "CUDA out of memory"
    assert sorted(result.pairs["seed"]) == [42, 123]
    assert result.stats["per_model"]["tinyllama-1.1b"]["matched"]["n_pairs"] == 2
    c2 = pd.read_csv(result.results_campaign2_csv)
    assert len(c2) == 7 and set(c2["status"]) == {"ok", "nan_abort", "failed"}
    failed = {(f["seed"], f["status"]) for f in result.stats["failed_cells"]}
    assert failed == {(999, "nan_abort"), (7, "failed")}
    report = result.report_md.read_text()
    assert "CUDA out of memory" in report and "nan_abort" in report


def test_model_with_only_failed_runs_gets_a_no_pairs_entry():
    rows = [make_row("pythia-1.4b", r, s, status="nan_abort", family="gpt_neox")
            for r in ("standard", "aletheia") for s in (42, 123, 999)]
    rows += pair_rows("qwen2.5-0.5b", [42, 123], [130.0, 128.0], [100.0, 97.0])
    result = aggregate_rows(rows, report=True)
    block = result.stats["per_model"]["pythia-1.4b"]["matched"]
    assert block["n_pairs"] == 0 and block["speedup_pct_mean"] is None
    assert block["note"].startswith("no pairs") and "nan_abort 6" in block["note"]
    assert "pythia-1.4b" in summary_table(result)


def test_corrupt_row_files_are_reported_and_skipped(tmp_path):
    camp = write_campaign(tmp_path, pair_rows("qwen2.5-0.5b", [42, 123], [130.0, 128.0], [100.0, 97.0]))
    truncated = camp / "cells" / "half-written" / "row.json"
    truncated.parent.mkdir(parents=True)
    text = json.dumps(make_row("qwen2.5-0.5b", "standard", 999))
    truncated.write_text(text[: len(text) // 2])
    invalid = camp / "cells" / "bad-status" / "row.json"
    invalid.parent.mkdir(parents=True)
    invalid.write_text(json.dumps(make_row("qwen2.5-0.5b", "aletheia", 999, status="weird")))
    (camp / "cells" / "still-running").mkdir()
    result = aggregate_campaign(tmp_path, CAMPAIGN, figures=False)
    assert {b.path for b in result.bad_rows} == {str(truncated), str(invalid)}
    assert result.n_rows == 4 and len(result.pairs) == 2
    data = strict_json(result.stats_json)
    assert {u["path"] for u in data["unreadable_rows"]} == {str(truncated), str(invalid)}
    assert any("status" in u["reason"] for u in data["unreadable_rows"])
    assert data["cells_without_row"] == [str(camp / "cells" / "still-running")]
    assert data["partial"] is True
    report = result.report_md.read_text()
    assert str(truncated) in report and str(invalid) in report


def test_partial_campaign_is_marked(tmp_path):
    write_campaign(tmp_path, pair_rows("qwen2.5-0.5b", [42, 123], [130.0, 128.0], [100.0, 97.0]))
    result = aggregate_campaign(tmp_path, CAMPAIGN, expected_cells=10, figures=False)
    assert result.partial is True
    assert result.stats["completeness"].startswith("4 of 10 cells have rows")
    report = result.report_md.read_text()
    assert "PARTIAL" in report and "4 of 10 cells have rows" in report
    assert "[PARTIAL]" in summary_table(result)
    complete = aggregate_campaign(tmp_path, CAMPAIGN, expected_cells=4, figures=False)
    assert complete.partial is False
    assert "PARTIAL" not in complete.report_md.read_text()
    assert "4 of 4 cells have rows" in complete.report_md.read_text()


def test_rows_with_zero_train_time_do_not_crash():
    # no-op cells (bench/dispatch.py) train for 0 s: every speedup is undefined, none is invented
    rows = [make_row("qwen2.5-0.5b", r, s, time_s=0.0, eval_loss=0.0) for r in ("standard", "aletheia") for s in (1, 2)]
    overall = aggregate_rows(rows).stats["overall"]
    assert overall["n_pairs"] == 2 and overall["speedup_pct_mean"] is None and overall["model_win_rate"] is None


def test_empty_campaign_does_not_crash(tmp_path):
    result = aggregate_campaign(tmp_path, "nothing", expected_cells=6)
    assert result.n_rows == 0 and result.partial is True
    data = strict_json(result.stats_json)
    assert data["overall"]["n_pairs"] == 0 and data["overall"]["note"].startswith("no pairs")
    assert len(pd.read_csv(result.runs_csv)) == 0
    assert set(result.skipped_figures) == set(FIGURE_FILES)
    assert "0 of 6 cells have rows" in result.report_md.read_text()


# -------------------------------------------------------------------- pairing and benchmarks

def test_compute_matched_pairs_with_matched_standard():
    rows = []
    std_loss = [0.31, 0.30, 0.32]
    cm_loss = [0.37, 0.36, 0.375]
    for k, seed in enumerate((42, 123, 999)):
        rows.append(make_row("qwen2.5-3b", "standard", seed, time_s=200.0 + k, eval_loss=std_loss[k]))
        rows.append(make_row("qwen2.5-3b", "aletheia", seed, time_s=150.0 + k, eval_loss=0.35))
        rows.append(make_row("qwen2.5-3b", "aletheia", seed, variant="compute_matched",
                             time_s=190.0 + 2 * k, eval_loss=cm_loss[k]))
    result = aggregate_rows(rows, report=False)
    cm = result.pairs[result.pairs["variant"] == "compute_matched"]
    assert len(cm) == 3 and set(cm["standard_variant"]) == {"matched"}
    assert set(cm["std_cell_id"]) == {f"qwen2.5-3b__standard__matched__s{s}" for s in (42, 123, 999)}
    section = result.stats["compute_matched"]
    assert section["n_pairs"] == 3
    q = section["per_model"]["qwen2.5-3b"]["quality"]["eval_loss"]
    assert q["std_mean"] == pytest.approx(np.mean(std_loss))
    assert q["arm_mean"] == pytest.approx(np.mean(cm_loss))
    assert q["diff_mean"] == pytest.approx(np.mean(np.subtract(cm_loss, std_loss)))
    assert q["p_value"] == pytest.approx(sps.ttest_rel(cm_loss, std_loss).pvalue, rel=1e-8)
    # overall covers the matched variant only; compute_matched sits in by_variant
    assert result.stats["overall"]["variant"] == "matched" and result.stats["overall"]["n_pairs"] == 3
    assert result.stats["by_variant"]["compute_matched"]["n_pairs"] == 3
    assert len(result.master) == 3
    assert set(result.stats["per_model"]["qwen2.5-3b"]) == {"matched", "compute_matched"}


def test_no_compute_matched_section_is_explicit():
    result = aggregate_rows(pair_rows("qwen2.5-0.5b", [1, 2], [130.0, 128.0], [100.0, 97.0]), report=False)
    cm = result.stats["compute_matched"]
    assert cm["n_pairs"] == 0 and cm["overall"] is None and "no compute_matched" in cm["note"]


def test_base_deltas_and_extra_forgetting_on_mmlu():
    rows = [make_row("qwen2.5-0.5b", "base", 0, mmlu=0.50, gsm8k=0.30)]
    std_mmlu = [0.48, 0.47, 0.49]
    arm_mmlu = [0.49, 0.495, 0.485]
    for k, seed in enumerate((42, 123, 999)):
        rows.append(make_row("qwen2.5-0.5b", "standard", seed, time_s=130.0 + k, mmlu=std_mmlu[k], gsm8k=0.31))
        rows.append(make_row("qwen2.5-0.5b", "aletheia", seed, time_s=100.0 - k, mmlu=arm_mmlu[k], gsm8k=0.29))
    result = aggregate_rows(rows, report=False)
    p = result.pairs.sort_values("seed")
    std_delta = (np.array(std_mmlu) - 0.50) * 100
    arm_delta = (np.array(arm_mmlu) - 0.50) * 100
    extra = arm_delta - std_delta
    by_seed = {42: 0, 123: 1, 999: 2}
    for _, r in p.iterrows():
        k = by_seed[r["seed"]]
        assert r["base_mmlu_pct"] == pytest.approx(50.0)
        assert r["std_mmlu_delta_pp"] == pytest.approx(std_delta[k])
        assert r["arm_mmlu_delta_pp"] == pytest.approx(arm_delta[k])
        assert r["mmlu_extra_pp"] == pytest.approx(extra[k])
    q = result.stats["per_model"]["qwen2.5-0.5b"]["matched"]["quality"]["mmlu"]
    assert q["n_with_base"] == 3 and q["base_mean"] == pytest.approx(50.0)
    assert q["std_delta_pp_mean"] == pytest.approx(std_delta.mean())
    assert q["arm_delta_pp_mean"] == pytest.approx(arm_delta.mean())
    assert q["extra_pp_mean"] == pytest.approx(extra.mean())
    assert q["extra_pp_sd"] == pytest.approx(extra.std(ddof=1))
    assert q["extra_pp_ci95"] == pytest.approx(list(scipy_ci(extra)))
    assert q["p_value"] == pytest.approx(sps.ttest_rel(np.array(arm_mmlu) * 100, np.array(std_mmlu) * 100).pvalue)
    g = result.stats["per_model"]["qwen2.5-0.5b"]["matched"]["quality"]["gsm8k"]
    assert g["diff_mean"] == pytest.approx(-2.0) and g["extra_pp_mean"] == pytest.approx(-2.0)
    assert g["note"].startswith("zero variance")
    assert "humaneval" not in result.stats["per_model"]["qwen2.5-0.5b"]["matched"]["quality"]
    m = result.master.sort_values("seed")
    assert list(m["mmlu_extra_pp"]) == pytest.approx([extra[0], extra[1], extra[2]])


def test_benchmarks_without_base_have_differences_but_no_deltas():
    rows = pair_rows("qwen2.5-7b", [1, 2, 3], [130.0, 128.0, 131.0], [100.0, 97.0, 99.0])
    for r, v in zip(rows, [0.40, 0.41, 0.42, 0.42, 0.43, 0.45]):
        r["mmlu_acc"] = v
    q = aggregate_rows(rows, report=False).stats["overall"]["quality"]["mmlu"]
    assert q["diff_mean"] == pytest.approx(np.mean([1.0, 0.0, 2.0]))  # pairs (.40,.41) (.42,.42) (.43,.45)
    assert "extra_pp_mean" not in q and "base_mean" not in q


def test_latest_row_wins_for_duplicate_keys():
    rows = pair_rows("qwen2.5-0.5b", [42], [130.0], [100.0])
    again = make_row("qwen2.5-0.5b", "standard", 42, time_s=140.0, finished_at="2025-03-02T00:00:00+00:00")
    again["cell_id"] = again["config_hash"] = "rerun-with-new-config"
    result = aggregate_rows(rows + [again], report=False)
    assert len(result.runs) == 3 and len(result.pairs) == 1
    assert result.pairs["std_train_time_s"].iloc[0] == 140.0
    assert result.stats["duplicate_runs_superseded"] == 1


def test_runs_csv_keeps_lists_as_json(tmp_path):
    scores = [0.5, 0.25, 1.0, 0.125]
    rows = [make_row("qwen2.5-0.5b", "aletheia", 42, num_layers=4, layer_scores=scores),
            make_row("qwen2.5-0.5b", "standard", 42, num_layers=4)]
    write_campaign(tmp_path, rows)
    result = aggregate_campaign(tmp_path, CAMPAIGN, figures=False, report=False)
    runs = pd.read_csv(result.runs_csv).set_index("recipe")
    assert json.loads(runs.loc["aletheia", "layer_scores"]) == scores
    assert json.loads(runs.loc["aletheia", "selected_layers"]) == [0, 2]
    assert json.loads(runs.loc["standard", "selected_layers"]) == [0, 1, 2, 3]
    assert pd.isna(runs.loc["standard", "layer_scores"])
    assert json.loads(runs.loc["aletheia", "package_versions"]) == {"torch": "2.4.1", "peft": "0.21.0"}
    assert runs.loc["aletheia", "n_selected_layers"] == 2 and runs.loc["aletheia", "train_steps"] == 200
    assert runs.loc["aletheia", "slurm_job_id"] == 77
    assert runs.loc["aletheia", "paper_model"] == "Qwen2.5-0.5B"


def test_aggregate_rows_without_out_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = aggregate_rows(pair_rows("qwen2.5-0.5b", [1, 2], [130.0, 128.0], [100.0, 97.0]))
    assert result.paths == {} and result.report and "qwen2.5-0.5b" in result.report
    assert list(tmp_path.iterdir()) == []


def test_paper_sized_campaigns_give_30_and_51_rows(tmp_path):
    """Campaign 1 shape -> 30 RESULTS_MASTER rows; Campaign 2 shape -> 51 RESULTS_CAMPAIGN2 rows."""
    seeds = (42, 123, 999)
    c1 = [r for entry in paper_speed_table() for r in
          pair_rows(config_name(entry["paper_model"]), seeds, [130.0, 131.0, 129.0], [100.0, 101.0, 99.0])]
    r1 = aggregate_rows(c1, out_dir=tmp_path / "c1", figures=False, report=False)
    assert len(pd.read_csv(r1.results_master_csv)) == 30
    c2 = []
    for model in ("qwen2.5-3b", "qwen2.5-7b", "llama-3.1-8b", "stablelm-2-1.6b", "gpt-j-6b", "mixtral-8x7b"):
        c2 += pair_rows(model, seeds, [130.0, 131.0, 129.0], [100.0, 101.0, 99.0], mmlu=0.5)
    for model in ("qwen2.5-3b", "qwen2.5-7b", "llama-3.1-8b"):
        c2 += [make_row(model, "aletheia", s, variant="compute_matched", time_s=125.0) for s in seeds]
    c2 += [make_row("pythia-1.4b", r, s, status="nan_abort", family="gpt_neox")
           for r in ("standard", "aletheia") for s in seeds]
    c2 += [make_row(m, "base", 0, mmlu=0.5) for m in ("qwen2.5-3b", "qwen2.5-7b")]
    r2 = aggregate_rows(c2, out_dir=tmp_path / "c2", figures=False, report=False)
    table = pd.read_csv(r2.results_campaign2_csv)
    assert len(table) == 51  # base-model evaluation cells are not runs
    assert (table["status"] == "nan_abort").sum() == 6
    assert len(pd.read_csv(r2.results_master_csv)) == 18


def test_bench_script_runs_small(capsys):
    """bench/aggregate.py stays runnable (tiny sizes here; the real floor is 100,000 rows < 10 s)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "aggregate.py"
    spec = importlib.util.spec_from_file_location("bench_aggregate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.synthetic_rows(600)
    assert len(rows) == 600 and len({r["cell_id"] for r in rows}) == 600
    assert module.main(["--rows", "600", "--files", "20"]) == 0
    out = capsys.readouterr().out
    assert "core: 600 rows" in out and "read: 20 row files" in out


def _cell(value):
    """A table value normalised for comparison: missing -> "", numbers (also as text) -> float."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def test_csv_files_read_back_equal_to_the_tables(tmp_path):
    """The hand-rolled CSV writer: values survive (12 significant digits), odd text is quoted."""
    rows = [make_row("qwen2.5-0.5b", "base", 0, mmlu=0.4321)]
    for seed in (42, 123, 999):
        rows += [make_row("qwen2.5-0.5b", "standard", seed, time_s=130.0 + seed / 7, mmlu=0.41, eval_loss=1 / 3),
                 make_row("qwen2.5-0.5b", "aletheia", seed, time_s=100.0 + seed / 11, mmlu=0.42),
                 make_row("qwen2.5-0.5b", "aletheia", seed, variant="compute_matched", time_s=125.5)]
    rows.append(make_row("mistral-7b", "aletheia", 1, status="failed", family="mistral",
                         failure_reason='OOM, "retry"\nsecond line'))
    result = aggregate_rows(rows, out_dir=tmp_path / "camp", figures=False, report=False)
    for path, frame in ((result.runs_csv, result.runs), (result.pairs_csv, result.pairs),
                        (result.results_master_csv, result.master),
                        (result.results_campaign2_csv, result.campaign2)):
        back = pd.read_csv(path)
        assert list(back.columns) == list(frame.columns) and len(back) == len(frame)
        for column in frame.columns:
            ours = frame[column]
            if ours.dtype == float:
                assert np.allclose(back[column].to_numpy(float), ours.to_numpy(float), rtol=1e-11,
                                   equal_nan=True), (path.name, column)
            else:
                assert [_cell(v) for v in back[column]] == [_cell(v) for v in ours], (path.name, column)
    failed = pd.read_csv(result.results_campaign2_csv).query("status == 'failed'")
    assert failed["failure_reason"].iloc[0] == 'OOM, "retry"\nsecond line'
