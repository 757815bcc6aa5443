"""``run_benchmarks``: evaluate a model on the configured benchmarks and return row fields."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from aletheia_hpc.evaluation import gsm8k, humaneval, mmlu
from aletheia_hpc.evaluation.data import load_benchmark, select_shots, select_subset
from aletheia_hpc.evaluation.settings import EvalSettings, coerce_settings

EMPTY_FIELDS = {"benchmarks": None, "mmlu_acc": None, "mmlu_n": None, "gsm8k_acc": None,
                "gsm8k_n": None, "humaneval_pass1": None, "humaneval_n": None,
                "eval_time_s": None, "eval_source": None}


def load_eval_data(benchmark: str, settings: EvalSettings) -> tuple[list, list, str]:
    """(evaluated records, few-shot records, source) for ``benchmark`` under ``settings``."""
    records, source = load_benchmark(benchmark, settings.source, settings.data_dir)
    keys = [r.key for r in records]
    n = {"mmlu": settings.mmlu_n, "gsm8k": settings.gsm8k_n,
         "humaneval": settings.humaneval_n}[benchmark]
    shots = {"mmlu": settings.mmlu_shots, "gsm8k": settings.gsm8k_shots, "humaneval": 0}[benchmark]
    subset = select_subset(keys, n, settings.subset_seed)
    shot_indices = select_shots(keys, shots, settings.subset_seed, subset)
    return [records[i] for i in subset], [records[i] for i in shot_indices], source


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


def run_benchmarks(model: torch.nn.Module, tokenizer, settings: EvalSettings | Any,
                   device: torch.device | str | None = None, progress: bool = True,
                   before_each: Callable[[str], None] | None = None) -> dict:
    """Run ``settings.benchmarks`` on ``model`` and return the row's evaluation fields.

    ``before_each(name)`` is called before each benchmark; whatever it raises ends the run (the
    worker stops there when the scheduler asks it to).

    Returns ``benchmarks`` (names that ran), ``mmlu_acc``/``mmlu_n``, ``gsm8k_acc``/``gsm8k_n``,
    ``humaneval_pass1``/``humaneval_n``/``humaneval_sandbox`` (the isolation every HumanEval run
    had; None for benchmarks not run), ``eval_time_s`` and
    ``eval_source`` (benchmark -> seconds / data source). ``settings`` may also be a dict or an
    OmegaConf node. The model is put in eval mode for the duration and restored afterwards.
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
    common = dict(batch_size=settings.batch_size, device=device, max_length=settings.max_length,
                  progress=progress)
    was_training = model.training
    model.eval()
    try:
        for name in settings.benchmarks:
            if before_each is not None:
                before_each(name)
            started = time.perf_counter()
            records, shots, source = load_eval_data(name, settings)
            if name == "mmlu":
                result = mmlu.evaluate(model, tokenizer, records, shots, **common)
                fields.update(mmlu_acc=result["acc"], mmlu_n=result["n"])
            elif name == "gsm8k":
                result = gsm8k.evaluate(model, tokenizer, records, shots,
                                        max_new_tokens=settings.gsm8k_max_new_tokens, **common)
                fields.update(gsm8k_acc=result["acc"], gsm8k_n=result["n"])
            else:
                result = humaneval.evaluate(
                    model, tokenizer, records, max_new_tokens=settings.humaneval_max_new_tokens,
                    timeout_s=settings.humaneval_timeout_s, memory_mb=settings.humaneval_memory_mb,
                    workers=settings.humaneval_workers, **common)
                fields.update(humaneval_pass1=result["pass1"], humaneval_n=result["n"],
                              humaneval_sandbox=result["isolation"])
            fields["benchmarks"].append(name)
            fields["eval_time_s"][name] = round(time.perf_counter() - started, 3)
            fields["eval_source"][name] = source
    finally:
        model.train(was_training)
    return fields
