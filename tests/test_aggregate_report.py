"""REPORT.md, figures, the paper reference data and the name lookup of the aggregate package."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd
import pytest

from aletheia_hpc.aggregate import (aggregate_campaign, aggregate_rows, config_name, load_paper_reference,
                                    paper_name, summary_table)
from aletheia_hpc.aggregate.figures import FIGURE_FILES
from aletheia_hpc.aggregate.paper import PAPER_REFERENCE_DIR, PAPER_TO_CONFIG
from tests.conftest import SHARED_PAPER
from tests.test_aggregate import CAMPAIGN, make_row, strict_json, write_campaign

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def full_campaign() -> list[dict]:
    """Two paper models and one of ours: base rows, MMLU/GSM8K, layer scores, compute-matched, a failure."""
    rows = []
    plan = {"qwen2.5-0.5b": ("qwen2", 1.35, 24), "mistral-7b": ("mistral", 1.38, 32),
            "my-tiny-llama": ("llama", 1.2, 4)}
    for model, (family, ratio, layers) in plan.items():
        rows.append(make_row(model, "base", 0, family=family, num_layers=layers, mmlu=0.40, gsm8k=0.20))
        for k, seed in enumerate((42, 123, 999)):
            ale = 100.0 + 3 * k
            scores = [((i * 7 + k) % layers) / layers + 0.01 for i in range(layers)]
            rows.append(make_row(model, "standard", seed, family=family, num_layers=layers,
                                 time_s=ale * ratio + k, eval_loss=0.30 + 0.01 * k, mmlu=0.39 - 0.005 * k,
                                 gsm8k=0.21))
            rows.append(make_row(model, "aletheia", seed, family=family, num_layers=layers, time_s=ale,
                                 eval_loss=0.33 + 0.005 * k, mmlu=0.395, gsm8k=0.19 + 0.01 * k,
                                 layer_scores=scores))
            rows.append(make_row(model, "aletheia", seed, variant="compute_matched", family=family,
                                 num_layers=layers, time_s=ale * 1.25, eval_loss=0.32, mmlu=0.40,
                                 layer_scores=scores))
    rows.append(make_row("pythia-1.4b", "standard", 42, status="nan_abort", family="gpt_neox"))
    return rows


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    rows = full_campaign()
    write_campaign(results, rows)
    result = aggregate_campaign(results, CAMPAIGN, expected_cells=len(rows))
    return result, result.report_md.read_text()


def test_figures_exist_and_are_png(rendered):
    result, _ = rendered
    assert set(result.figures) == set(FIGURE_FILES) and not result.skipped_figures
    for name, filename in FIGURE_FILES.items():
        path = result.out_dir / "figures" / filename
        assert path == result.figures[name]
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 1024, name


def test_report_links_every_figure_relatively(rendered):
    result, report = rendered
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(links) == sorted(f"figures/{f}" for f in FIGURE_FILES.values())
    for link in links:
        assert (result.out_dir / link).is_file()


def test_report_paper_vs_run_table(rendered):
    result, report = rendered
    assert "## Paper vs this run" in report
    section = report.split("## Paper vs this run", 1)[1]
    line = next(ln for ln in section.splitlines() if ln.startswith("| Qwen2.5-0.5B |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    measured = result.stats["per_model"]["qwen2.5-0.5b"]["matched"]["ratio_mean"]
    assert cells[1] == "qwen2.5-0.5b" and cells[2] == "1.353" and cells[3] == f"{measured:.3f}"
    # a paper model this campaign did not run is still listed, with the paper's value
    assert re.search(r"\| Qwen2\.5-72B \| qwen2\.5-72b \(not run\) \| 1\.187 \|", section)
    # the MMLU table (paper Table 3) holds the paper's extra forgetting beside the measured one
    mistral = next(ln for ln in section.split("MMLU forgetting", 1)[1].splitlines()
                   if ln.startswith("| Mistral-7B |"))
    assert "+1.5" in mistral and "40.3" in mistral
    # compute-matched table (paper Table 5) and models the paper lacks
    assert "| Qwen2.5-3B | qwen2.5-3b (not run) | 0.311 |" in section
    assert "my-tiny-llama" in section.split("does not report", 1)[1]


def test_report_sections_and_provenance(rendered):
    result, report = rendered
    for heading in ("## Headline", "## Training time per model", "## Speedup by family",
                    "## Quality: eval loss and benchmarks", "## Compute-matched Aletheia",
                    "## Failed cells", "## Provenance", "## Conventions"):
        assert heading in report
    assert "a1b2c3d" in report and "NVIDIA A100-SXM4-64GB" in report and "gpu-node-07" in report
    assert "torch" in report and "2.4.1" in report
    assert "pythia-1.4b" in report and "nan_abort" in report
    assert "PARTIAL" not in report
    assert f"{result.n_rows} of {result.n_rows} cells have rows" in report
    assert "Cohen's d for paired samples" in report


def test_summary_table_lists_models(rendered):
    result, _ = rendered
    table = summary_table(result)
    lines = table.splitlines()
    assert any(ln.startswith("qwen2.5-0.5b") and "matched" in ln for ln in lines)
    block = result.stats["per_model"]["mistral-7b"]["matched"]
    row = next(ln for ln in lines if ln.startswith("mistral-7b") and " matched " in ln)
    assert f"{block['speedup_pct_mean']:.1f}" in row and f"{block['std_time_s_mean']:.1f}" in row
    assert lines[-3].startswith("ALL") and lines[-1].startswith("GPU-hours")


def test_figures_are_skipped_when_data_is_absent(tmp_path):
    rows = []
    for seed in (1, 2):
        rows.append(make_row("qwen2.5-0.5b", "standard", seed, time_s=130.0 + seed))
        rows.append(make_row("qwen2.5-0.5b", "aletheia", seed, time_s=100.0, layer_scores=None))
    for r in rows:
        r["layer_scores"] = None
    stale = tmp_path / CAMPAIGN / "figures" / FIGURE_FILES["layer_scores"]
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_SIGNATURE)
    write_campaign(tmp_path, rows)
    result = aggregate_campaign(tmp_path, CAMPAIGN)
    assert set(result.figures) == {"speedup_per_model", "speedup_by_family"}
    assert set(result.skipped_figures) == {"benchmark_deltas", "speed_quality", "layer_scores", "arms_pareto",
                                           "compute_matched_deltas"}
    assert not stale.exists()
    report = result.report_md.read_text()
    assert "skipped (no Aletheia row carries layer_scores)" in report
    assert "figures/layer_scores_heatmap.png" not in report


def test_report_without_figures_says_so():
    rows = [make_row("qwen2.5-0.5b", r, 1, time_s=t) for r, t in (("standard", 130.0), ("aletheia", 100.0))]
    result = aggregate_rows(rows, figures=False)
    assert "Figures were not generated" in result.report


# --------------------------------------------------------------------------- paper reference

def test_paper_name_lookup_is_case_insensitive():
    assert config_name("Qwen2.5-0.5B") == "qwen2.5-0.5b"
    assert config_name("QWEN2.5-0.5b") == "qwen2.5-0.5b"
    assert config_name("Mixtral-8x7B") == "mixtral-8x7b" == config_name("Mixtral-87B")
    assert config_name("Phi-3.5-mini") == "phi-3.5-mini"
    assert config_name("not-a-model") is None
    assert paper_name("llama-3.1-70b") == "Llama-3.1-70B"
    assert paper_name("Llama-3.1-70B") == "Llama-3.1-70B"
    assert paper_name("meta-llama/Llama-3.1-8B") == "Llama-3.1-8B"
    assert paper_name("my-tiny-llama") is None
    expected = {"qwen2.5-0.5b", "tinyllama-1.1b", "qwen2.5-1.5b", "stablelm-2-1.6b", "qwen2.5-3b",
                "phi-3.5-mini", "gpt-j-6b", "qwen2.5-7b", "mistral-7b", "llama-3.1-8b", "qwen2.5-14b",
                "mixtral-8x7b", "llama-3.1-70b", "qwen2.5-72b", "pythia-1.4b"}
    assert set(PAPER_TO_CONFIG.values()) == expected


def test_reference_data_is_shipped_and_consistent():
    ref = load_paper_reference()
    assert ref.found and ref.directory == PAPER_REFERENCE_DIR
    assert PAPER_REFERENCE_DIR == Path(__file__).resolve().parent.parent / "results" / "paper_reference"
    assert (PAPER_REFERENCE_DIR / "README.md").is_file()
    assert len(ref.speed) == 10 and len(ref.mmlu) == 10 and len(ref.campaign2_abs) == 6
    assert len(ref.compute_matched) == 3
    assert ref.speed["qwen2.5-72b"]["time_ratio"] == 1.187
    assert ref.mmlu["tinyllama-1.1b"]["extra_pp"] == 1.8
    assert ref.compute_matched["llama-3.1-8b"]["cm_ale_eval_loss"] == 0.716
    assert ref.headline["speedup_pct_mean"] == 23.1 and ref.headline["time_ratio_mean"] == 1.305
    for cfg, entry in ref.models.items():  # the CSV's `model` column is the shipped lookup
        assert PAPER_TO_CONFIG[entry["paper_model"]] == entry["model"] == cfg


@pytest.mark.skipif(not SHARED_PAPER.is_dir(), reason="paper tables not available on this machine")
def test_reference_data_matches_the_paper_tables():
    ref = load_paper_reference()
    with open(SHARED_PAPER / "paper_table1_table2.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["std_over_ale_time_ratio"]:
                ours = ref.speed[config_name(row["model"])]
                assert ours["time_ratio"] == float(row["std_over_ale_time_ratio"])
                assert ours["speedup_pct"] == float(row["speedup_pct_derived"])
    with open(SHARED_PAPER / "paper_table3_mmlu.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            ours = ref.mmlu[config_name(row["model"])]
            assert ours["std_delta_pp"] == float(row["std_delta_pp"])
            assert ours["extra_pp"] == float(row["extra_pp"])


def test_missing_reference_data_is_not_fatal(tmp_path):
    ref = load_paper_reference(tmp_path / "nowhere")
    assert not ref.found
    rows = [make_row("qwen2.5-0.5b", r, 1, time_s=t) for r, t in (("standard", 130.0), ("aletheia", 100.0))]
    result = aggregate_rows(rows, figures=False, paper_reference=ref)
    assert "Paper reference data not found" in result.report


# ------------------------------------------------------------------------------ GPU-hours

def write_accounting(results: Path, row: dict, *jobs: tuple[float, int]) -> None:
    """accounting.json beside the row, as ``status`` writes it: (elapsed_s, alloc_gpus) per job."""
    from types import SimpleNamespace

    from aletheia_hpc.campaign.store import record_accounting

    where = SimpleNamespace(campaign=row["campaign"], cell_id=row["cell_id"])  # all cell_path reads
    for i, (elapsed, gpus) in enumerate(jobs):
        record_accounting(results, where, f"9{i}_0", {"elapsed_s": elapsed, "alloc_cpus": 4, "alloc_gpus": gpus,
                                                      "max_rss_mib": 900.0})


def test_report_gives_gpu_hours_per_arm_and_what_aletheia_saved(tmp_path):
    """GPU-hours come from the accounting.json files beside the rows; what Aletheia saved is summed
    over its pairs with Standard whose two cells are accounted and ran on one hardware."""
    std = {s: make_row("qwen2.5-0.5b", "standard", s, time_s=130.0) for s in (1, 2, 3, 4)}
    ale = {s: make_row("qwen2.5-0.5b", "aletheia", s, time_s=100.0) for s in (1, 2, 3, 4)}
    ale[3]["gpu_name"] = "NVIDIA H100"  # another GPU type: its pair is left out of the saving
    failed = make_row("mistral-7b", "aletheia", 1, status="failed", family="mistral")
    rows = [*std.values(), *ale.values(), failed]
    write_campaign(tmp_path, rows)
    write_accounting(tmp_path, std[1], (3600, 1))
    write_accounting(tmp_path, ale[1], (1800, 1), (900, 1))  # requeued once: both runs were paid for
    write_accounting(tmp_path, std[2], (1800, 2))
    write_accounting(tmp_path, ale[2], (2400, 2))
    write_accounting(tmp_path, std[3], (3600, 1))
    write_accounting(tmp_path, ale[3], (1200, 1))
    write_accounting(tmp_path, ale[4], (1200, 1))  # its Standard partner was never accounted
    write_accounting(tmp_path, failed, (720, 4))
    result = aggregate_campaign(tmp_path, CAMPAIGN, expected_cells=len(rows), figures=False)

    cost = result.stats["cost"]
    assert (cost["n_cells"], cost["n_cells_accounted"]) == (9, 8)
    assert cost["per_arm"]["standard"] == {"cells": 4, "cells_accounted": 3, "gpu_hours": pytest.approx(1 + 1 + 1)}
    assert cost["per_arm"]["aletheia"] == {"cells": 5, "cells_accounted": 5,
                                           "gpu_hours": pytest.approx(0.75 + 4 / 3 + 1 / 3 + 1 / 3 + 0.8)}
    assert cost["per_model"]["mistral-7b"]["aletheia"]["gpu_hours"] == pytest.approx(0.8)
    saved = cost["saved"]["aletheia"]["overall"]
    assert (saved["n_pairs"], saved["n_pairs_unaccounted"], saved["n_pairs_mixed_hardware"]) == (2, 1, 1)
    assert saved["standard_gpu_hours"] == pytest.approx(2.0)
    assert saved["arm_gpu_hours"] == pytest.approx(0.75 + 4 / 3)
    assert saved["saved_gpu_hours"] == pytest.approx(2.0 - 0.75 - 4 / 3)
    assert saved["saved_pct"] == pytest.approx(100 * (2.0 - 0.75 - 4 / 3) / 2.0)
    assert strict_json(result.stats_json)["cost"]["saved"]["aletheia"]["overall"]["n_pairs"] == 2

    runs = pd.read_csv(result.runs_csv).set_index("cell_id")
    assert runs.loc[ale[1]["cell_id"], "gpu_hours"] == pytest.approx(0.75)
    assert runs.loc[ale[1]["cell_id"], "job_elapsed_s"] == pytest.approx(2700)
    assert pd.isna(runs.loc[std[4]["cell_id"], "gpu_hours"])
    pairs = pd.read_csv(result.pairs_csv).set_index("seed")
    assert pairs.loc[2, "std_gpu_hours"] == pytest.approx(1.0) and pairs.loc[2, "arm_gpu_hours"] == pytest.approx(4 / 3)

    report = result.report_md.read_text()
    section = report.split("## Cost in GPU-hours", 1)[1].split("\n## ", 1)[0]
    assert f"**Aletheia saved {saved['saved_gpu_hours']:.3f} GPU-hours against Standard LoRA" in section
    assert "8 of 9 cells accounted" in section
    assert "| standard | all | 4 | 3 | 3.000 |" in section
    assert "| aletheia | mistral-7b | 1 | 1 | 0.800 |" in section
    line = next(ln for ln in section.splitlines() if ln.startswith("| aletheia | all | 2 |"))
    assert "| 2.000 | 2.083 | -0.083 |" in line and "left out: 1 unaccounted, 1 on mixed hardware" in line
    assert summary_table(result).splitlines()[-1] == (
        f"GPU-hours (scheduler accounting): aletheia={cost['per_arm']['aletheia']['gpu_hours']:.3f} (5 cells), "
        f"standard=3.000 (3 cells); Aletheia saved {saved['saved_gpu_hours']:.3f} over 2 pair(s), probe included")


def test_report_without_accounting_says_so_in_one_line(rendered):
    result, report = rendered
    section = report.split("## Cost in GPU-hours", 1)[1].split("\n## ", 1)[0].strip()
    assert section.startswith(f"No GPU-hours: none of the {result.n_rows} cell(s) has the scheduler's accounting")
    assert len(section.splitlines()) == 1
    assert result.stats["cost"]["n_cells_accounted"] == 0 and result.stats["cost"]["saved"]["aletheia"]["overall"][
        "n_pairs"] == 0
    assert summary_table(result).splitlines()[-1].startswith("GPU-hours: none")


def test_report_of_cpu_only_jobs_claims_no_saving(tmp_path):
    """Jobs that allocated no GPU are accounted, but zero GPU-hours is no saving: the report says so
    instead of printing a 0.000 saving."""
    rows = [make_row("qwen2.5-0.5b", recipe, 1, time_s=t) for recipe, t in (("standard", 130.0), ("aletheia", 100.0))]
    write_campaign(tmp_path, rows)
    for row in rows:
        write_accounting(tmp_path, row, (60, 0))
    result = aggregate_campaign(tmp_path, CAMPAIGN, expected_cells=len(rows), figures=False)
    section = result.report_md.read_text().split("## Cost in GPU-hours", 1)[1].split("\n## ", 1)[0]
    assert "2 of 2 cells accounted, 0.000 GPU-hours in all" in section
    assert "allocated no GPU (CPU-only cells" in section and "saved" not in section, section
