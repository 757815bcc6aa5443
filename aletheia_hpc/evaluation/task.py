"""Held-out task accuracy: exact match of the generated response on the cell's held-out records.

The cell's own instruction data (``data.source``) is split once per campaign
(``data.eval_size``, ``data.split_seed``); the held-out records are never trained on. Each is
prompted exactly as in training (BOS, the ``data.template`` prompt) and the model generates
greedily until its end-of-sequence token, a new "###" section or ``eval.task_max_new_tokens``.
A record is correct when the response equals the record's ``output`` after trimming and
collapsing whitespace. This is a quality signal a small model can move in a few steps, unlike
MMLU at chance.
"""

from __future__ import annotations

from aletheia_hpc.evaluation.benchmarks import BenchmarkContext, BenchmarkResult
from aletheia_hpc.evaluation.data import record_id
from aletheia_hpc.evaluation.generation import generate_greedy

STOP_STRINGS = ("\n###", "### ")


def normalize(text: str) -> str:
    return " ".join(str(text).split())


def prompt_ids(record: dict, tokenizer, template: str) -> list[int]:
    """The prompt tokens training uses for ``record`` (see data.instructions.tokenize_records)."""
    from aletheia_hpc.data.instructions import format_prompt

    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + tokenizer(format_prompt(record, template), add_special_tokens=False)["input_ids"]


def run(context: BenchmarkContext) -> BenchmarkResult:
    if context.held_out is None:
        raise ValueError("eval.benchmarks has 'task', which scores the cell's held-out instruction "
                         "records: pass held_out= to run_benchmarks (the worker does)")
    n = context.settings.task_n
    records = context.held_out[:n] if n else list(context.held_out)
    completions = generate_greedy(context.model, context.tokenizer,
                                  [prompt_ids(r, context.tokenizer, context.template) for r in records],
                                  max_new_tokens=context.settings.task_max_new_tokens,
                                  stop_strings=STOP_STRINGS, desc="task", **context.common)
    samples = []
    for record, completion in zip(records, completions):
        key = record["instruction"] + "\x1f" + str(record.get("input") or "")
        samples.append({"id": record_id(key), "generation": completion,
                        "target": str(record["output"]),
                        "correct": normalize(completion) == normalize(record["output"])})
    score = sum(s["correct"] for s in samples) / len(samples) if samples else None
    return BenchmarkResult(score, len(samples), f"held-out:{len(context.held_out)} records", samples)
