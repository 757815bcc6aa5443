"""Benchmark of campaign aggregation (issue #4); the floor is under 10 s for 100,000 rows.

Two timings:
  core   -- ``aggregate_rows`` on N synthetic row dicts already in memory (tables, stats, CSVs,
            stats.json and REPORT.md written to a temporary folder; figures only with --figures)
  read   -- ``load_rows`` on M real row files written with ``write_row`` beforehand

    .venv/bin/python bench/aggregate.py                  # 100,000 rows, 5,000 row files
    .venv/bin/python bench/aggregate.py --rows 20000 --files 1000 --figures
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aletheia_hpc.aggregate import aggregate_rows, load_rows  # noqa: E402
from aletheia_hpc.row import write_row  # noqa: E402

MODELS = [("qwen2.5-0.5b", "qwen2", 24), ("tinyllama-1.1b", "llama", 22), ("qwen2.5-1.5b", "qwen2", 28),
          ("phi-3.5-mini", "phi3", 32), ("qwen2.5-7b", "qwen2", 28), ("mistral-7b", "mistral", 32),
          ("llama-3.1-8b", "llama", 32), ("qwen2.5-14b", "qwen2", 48), ("llama-3.1-70b", "llama", 80),
          ("qwen2.5-72b", "qwen2", 80), ("stablelm-2-1.6b", "stablelm", 24), ("qwen2.5-3b", "qwen2", 36),
          ("gpt-j-6b", "gptj", 28), ("mixtral-8x7b", "mixtral", 32), ("pythia-1.4b", "gpt_neox", 24)]
CELLS = (("standard", "matched"), ("aletheia", "matched"), ("aletheia", "compute_matched"))


def synthetic_row(campaign: str, model: str, family: str, layers: int, recipe: str, variant: str,
                  seed: int, rng: random.Random) -> dict:
    """A schema-valid row; about 1% fail, Pythia always hits NaN."""
    cell_id = f"{model}-{recipe}-{variant}-s{seed}"
    failed = model.startswith("pythia") or rng.random() < 0.01
    scores = [rng.random() for _ in range(layers)] if recipe == "aletheia" else None
    selected = (sorted(sorted(range(layers), key=lambda i: -scores[i])[: layers // 2])
                if scores else list(range(layers)))
    base_time = 50.0 + 5.0 * layers
    time_s = base_time * (rng.uniform(0.72, 0.85) if recipe == "aletheia" else 1.0) * (
        1.25 if variant == "compute_matched" else 1.0) * rng.uniform(0.97, 1.03)
    return {
        "campaign": campaign, "cell_id": cell_id, "config_hash": cell_id, "model": model,
        "family": family, "recipe": recipe, "variant": variant, "seed": seed,
        "status": "nan_abort" if failed else "ok",
        "failure_reason": "non-finite loss (fp16)" if failed else None,
        "nan_step": 3 if failed else None, "num_layers": layers, "selected_layers": selected,
        "layer_scores": scores, "trainable_params": 1_000_000 * len(selected),
        "train_steps": 3 if failed else 200, "planned_steps": 200,
        "train_time_s": None if failed else time_s, "probe_time_s": 2.0 if scores else None,
        "step_time_median_s": time_s / 200, "final_train_loss": None if failed else rng.uniform(0.8, 1.2),
        "eval_loss": None if failed else rng.uniform(0.9, 1.3), "attempts": 1,
        "benchmarks": ["mmlu"], "mmlu_acc": rng.uniform(0.3, 0.6), "mmlu_n": 200,
        "started_at": "2025-01-01T00:00:00Z", "finished_at": "2025-01-01T01:00:00Z",
        "host": f"node{seed % 64:03d}", "device": "cuda", "gpu_name": "NVIDIA A100-SXM4-64GB",
        "git_sha": "0123abcd", "git_dirty": False,
        "package_versions": {"torch": "2.4.1", "transformers": "5.0.0", "peft": "0.21.0"},
        "slurm": {"job_id": "1", "array_job_id": "1", "array_task_id": str(seed), "node": "n1"},
    }


def synthetic_rows(n: int, campaign: str = "bench", seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    for model, family, layers in MODELS:
        rows.append({**synthetic_row(campaign, model, family, layers, "base", "matched", 0, rng),
                     "cell_id": f"{model}-base", "config_hash": f"{model}-base", "status": "ok",
                     "failure_reason": None, "train_time_s": None, "eval_loss": None, "nan_step": None})
    s = 0
    while len(rows) < n:
        for model, family, layers in MODELS:
            for recipe, variant in CELLS:
                if len(rows) < n:
                    rows.append(synthetic_row(campaign, model, family, layers, recipe, variant, s, rng))
        s += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic rows for the core timing")
    parser.add_argument("--files", type=int, default=5_000, help="row files for the read timing (0: skip)")
    parser.add_argument("--figures", action="store_true", help="also draw the figures in the core timing")
    args = parser.parse_args(argv)

    rows = synthetic_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        result = aggregate_rows(rows, campaign="bench", out_dir=Path(tmp) / "bench", figures=args.figures)
        core_s, core_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"core: {len(rows)} rows -> {len(result.pairs)} pairs, aggregated and written in {core_s:.2f} s "
          f"wall / {core_cpu:.2f} s CPU (figures {'on' if args.figures else 'off'})")

    if args.files:
        file_rows = synthetic_rows(args.files, campaign="files", seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            for row in file_rows:
                write_row(Path(tmp) / "files" / "cells" / row["cell_id"] / "row.json", row)
            start = time.perf_counter()
            loaded = load_rows(Path(tmp), "files")
            read_s = time.perf_counter() - start
        print(f"read: {len(loaded.rows)} row files read and validated in {read_s:.2f} s "
              f"({len(loaded.bad_rows)} unreadable)")
    scale = 100_000 / max(len(rows), 1)
    verdict = lambda seconds: "PASS" if seconds * scale < 10 else "FAIL"  # noqa: E731
    # wall time also counts other processes on a shared machine; CPU time is this process alone
    print(f"floor: core under 10 s for 100,000 rows -> wall {verdict(core_s)}, CPU {verdict(core_cpu)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
