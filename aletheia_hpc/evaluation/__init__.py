"""Benchmark evaluation of fine-tuned models: MMLU, GSM8K, HumanEval, held-out task accuracy.

Public entry points::

    from aletheia_hpc.evaluation import EvalSettings, validate, run_benchmarks
    fields = run_benchmarks(model, tokenizer, EvalSettings(benchmarks=["mmlu"], mmlu_n=200))

Submodules: ``benchmarks`` (the registry: one entry per benchmark), ``settings`` (EvalSettings,
validate), ``data`` (sources, subsets), ``scoring`` (pure scoring functions), ``generation``
(batched forwards and greedy generation), ``mmlu``, ``gsm8k``, ``humaneval``, ``task``,
``sandbox`` (contained execution of untrusted code), ``runner`` (run_benchmarks).

Names are imported lazily, so ``aletheia_hpc.evaluation.sandbox`` and ``.settings`` can be used
without importing torch or transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalSettings": "settings", "validate": "settings", "coerce_settings": "settings",
    "BENCHMARKS": "settings", "SOURCES": "settings",
    "run_benchmarks": "runner", "load_eval_data": "data", "REGISTRY": "benchmarks",
    "load_benchmark": "data", "select_subset": "data", "DataSourceError": "data",
    "extract_number": "scoring",
    "SandboxLimits": "sandbox", "SandboxResult": "sandbox", "run_untrusted": "sandbox",
    "isolation_summary": "sandbox",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
