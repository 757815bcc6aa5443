"""``run_benchmarks``: evaluate a model on the configured benchmarks and return row fields."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from aletheia_hpc.evaluation.benchmarks import REGISTRY, BenchmarkContext, row_fields, samples_path
from aletheia_hpc.evaluation.settings import EvalSettings, coerce_settings
from aletheia_hpc.files import atomic_write

EMPTY_FIELDS = {"benchmarks": None, **{name: None for name in row_fields()},
                "eval_time_s": None, "eval_source": None}


def preflight(settings: EvalSettings | Any) -> dict | None:
    """Fail now, before any model is loaded, when this node's sandbox cannot give what
    ``eval.sandbox.require`` asks for (HumanEval only); returns the probe's isolation record."""
    settings = coerce_settings(settings)
    if "humaneval" not in settings.benchmarks or not settings.sandbox.require:
        return None
    from aletheia_hpc.evaluation.sandbox import SandboxLimits, check_requirements

    return check_requirements(settings.sandbox.require,
                              SandboxLimits(timeout_s=settings.humaneval_timeout_s,
                                            memory_mb=settings.humaneval_memory_mb))


def write_samples(path: Path, samples: list[dict]) -> None:
    """One JSON object per question, written atomically (not fsynced: the row, written after it, is)."""
    atomic_write(path, "".join(json.dumps(sample, sort_keys=True, default=str) + "\n" for sample in samples),
                 fsync=False)


def run_benchmarks(model: torch.nn.Module, tokenizer, settings: EvalSettings | Any,
                   device: torch.device | str | None = None, progress: bool = True,
                   before_each: Callable[[str], None] | None = None,
                   held_out: list[dict] | None = None, template: str = "alpaca",
                   cell_dir: Path | None = None) -> dict:
    """Run ``settings.benchmarks`` on ``model`` and return the row's evaluation fields.

    ``before_each(name)`` is called before each benchmark; whatever it raises ends the run (the
    worker stops there when the scheduler asks it to). ``held_out``/``template``: the cell's
    held-out instruction records and prompt template (the ``task`` benchmark). With
    ``cell_dir`` each benchmark's per-question results go to ``<cell_dir>/samples/<name>.jsonl``.

    Returns ``benchmarks`` (names that ran), each registered benchmark's score and count fields
    (see :mod:`.benchmarks`; None for benchmarks not run), ``humaneval_sandbox`` (the isolation
    every HumanEval run had), ``eval_time_s`` and ``eval_source`` (benchmark -> seconds / data
    source). ``settings`` may also be a dict or an OmegaConf node. The model is put in eval mode
    for the duration and restored afterwards.
    """
    settings = coerce_settings(settings)
    preflight(settings)
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    fields = dict(EMPTY_FIELDS)
    fields.update(benchmarks=[], eval_time_s={}, eval_source={})
    context = BenchmarkContext(model, tokenizer, settings,
                               dict(batch_size=settings.batch_size, device=device,
                                    max_length=settings.max_length, progress=progress),
                               held_out=held_out, template=template)
    was_training = model.training
    model.eval()
    try:
        for name in settings.benchmarks:
            if before_each is not None:
                before_each(name)
            benchmark = REGISTRY[name]
            started = time.perf_counter()
            result = benchmark.runner()(dataclasses.replace(context, benchmark=name))
            fields[benchmark.score_field] = result.score
            fields[benchmark.n_field] = result.n
            fields.update(result.fields)
            fields["benchmarks"].append(name)
            fields["eval_time_s"][name] = round(time.perf_counter() - started, 3)
            fields["eval_source"][name] = result.source
            if cell_dir is not None:
                write_samples(samples_path(cell_dir, name), result.samples)
    finally:
        model.train(was_training)
    return fields
