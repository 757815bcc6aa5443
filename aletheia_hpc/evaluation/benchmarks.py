"""The benchmark registry: the one place that names a benchmark, its row fields and its code.

To add a benchmark: write a module with ``run(context: BenchmarkContext) -> BenchmarkResult``,
add its :class:`Benchmark` to :data:`REGISTRY`, and its count/shot settings to
:class:`~aletheia_hpc.evaluation.settings.EvalSettings` if it has any. Row fields
(``<score_field>``, ``<n_field>``), the settings' list of valid names, aggregation's tables and
report labels, and the per-question ``samples/<name>.jsonl`` all follow from the entry.

This module imports nothing heavy (no torch): settings, rows and aggregation read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Benchmark:
    name: str  # as in eval.benchmarks and samples/<name>.jsonl
    label: str  # in reports
    score_field: str  # the row field of the score (a fraction in [0, 1])
    n_field: str  # the row field of the number of questions scored
    module: str  # aletheia_hpc.evaluation.<module> defines run(context)
    chance: float | None = 0.0  # accuracy of a uniform guess (0: a generated answer is rarely right by luck)
    held_out: bool = False  # scores the cell's own held-out instruction records
    extra_fields: tuple[str, ...] = ()  # further row fields it writes (None when it did not run)

    def runner(self) -> Callable[["BenchmarkContext"], "BenchmarkResult"]:
        return importlib.import_module(f"aletheia_hpc.evaluation.{self.module}").run


@dataclass
class BenchmarkContext:
    """What a benchmark's ``run`` gets: the model, the settings, and the cell's held-out data."""

    model: Any
    tokenizer: Any
    settings: Any  # EvalSettings
    common: dict  # batch_size, device, max_length, progress
    held_out: list[dict] | None = None  # the cell's held-out instruction records
    template: str = "alpaca"
    benchmark: str = ""  # the registry name being run (one module may serve several benchmarks)


@dataclass
class BenchmarkResult:
    score: float | None
    n: int
    source: str  # where the questions came from
    # one per question: {"id", "correct", and "choice" or "generation" (+ "target"/"prediction")}
    samples: list[dict] = field(default_factory=list)
    fields: dict = field(default_factory=dict)  # further row fields (e.g. humaneval_sandbox)


def _choice(name: str, label: str, choices: int) -> Benchmark:
    """A multiple-choice set scored by log-likelihood (module ``choice``): acc is the row's score,
    acc_norm (length-normalised, as lm-evaluation-harness defines it) a further field."""
    return Benchmark(name, label, f"{name}_acc", f"{name}_n", "choice", chance=1 / choices,
                     extra_fields=(f"{name}_acc_norm",))


REGISTRY: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mmlu", "MMLU", "mmlu_acc", "mmlu_n", "mmlu", chance=0.25),
    Benchmark("gsm8k", "GSM8K", "gsm8k_acc", "gsm8k_n", "gsm8k"),
    Benchmark("humaneval", "HumanEval", "humaneval_pass1", "humaneval_n", "humaneval",
              extra_fields=("humaneval_sandbox",)),
    Benchmark("task", "Held-out task accuracy", "task_acc", "task_n", "task", held_out=True),
    _choice("arc_easy", "ARC-Easy", 4),
    _choice("arc_challenge", "ARC-Challenge", 4),
    _choice("piqa", "PIQA", 2),
    _choice("sciq", "SciQ", 4),
    _choice("hellaswag", "HellaSwag", 4),
)}
BENCHMARK_NAMES = tuple(REGISTRY)
CHOICE_BENCHMARKS = tuple(b.name for b in REGISTRY.values() if b.module == "choice")
SAMPLES_DIR = "samples"  # <cell dir>/samples/<benchmark>.jsonl: one JSON object per question
SCORE_FIELDS = {b.name: b.score_field for b in REGISTRY.values()}


def row_fields() -> tuple[str, ...]:
    """Every per-benchmark row field, in registry order: score and count, then the further ones."""
    out: list[str] = []
    for b in REGISTRY.values():
        out += [b.score_field, b.n_field]
    return (*out, *(f for b in REGISTRY.values() for f in b.extra_fields))


def samples_path(cell_dir, name: str):
    from pathlib import Path

    return Path(cell_dir) / SAMPLES_DIR / f"{name}.jsonl"


def read_samples(cell_dir, name: str) -> list[dict] | None:
    """A cell's per-question results for one benchmark; None where it has none."""
    import json

    path = samples_path(cell_dir, name)
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
