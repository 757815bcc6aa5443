"""MMLU: multiple choice by the log-likelihood of each answer letter after a fixed prompt.

Prompt (k-shot prefix, then the question)::

    The following are multiple choice questions (with answers).

    <shot question>
    A. <choice>
    ...
    Answer: C

    <question>
    A. <choice>
    B. <choice>
    C. <choice>
    D. <choice>
    Answer:

The model's choice is the letter whose continuation (" A", " B", " C", " D") has the highest
log-likelihood. With tokenizers that encode each continuation as one token (all the usual ones)
one forward pass over the prompt scores all four letters; a continuation of k>1 tokens is scored
from one extra row (prompt + its first k-1 tokens), so any tokenizer is handled exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from aletheia_hpc.evaluation.benchmarks import BenchmarkContext, BenchmarkResult
from aletheia_hpc.evaluation.data import LETTERS, MCQuestion, load_eval_data, record_id
from aletheia_hpc.evaluation.generation import (batches_longest_first, context_limit,
                                                encode_prompts, forward_last_logprobs,
                                                model_device, pad_token_id)
from aletheia_hpc.evaluation.scoring import choose, continuation_logprob

HEADER = "The following are multiple choice questions (with answers).\n\n"


def format_question(q: MCQuestion, with_answer: bool = False) -> str:
    text = q.question.strip() + "\n"
    text += "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, q.choices))
    text += "Answer:"
    if with_answer:
        text += f" {LETTERS[q.answer]}\n\n"
    return text


def build_prompt(q: MCQuestion, shots: Sequence[MCQuestion] = ()) -> str:
    return HEADER + "".join(format_question(s, with_answer=True) for s in shots) + format_question(q)


def letter_continuations(tokenizer) -> list[list[int]]:
    conts = [list(tokenizer.encode(" " + letter, add_special_tokens=False)) for letter in LETTERS]
    if any(not c for c in conts):
        raise ValueError("the tokenizer encodes an answer letter as no tokens")
    return conts


@torch.inference_mode()
def score_questions(model, tokenizer, questions: Sequence[MCQuestion],
                    shots: Sequence[MCQuestion] = (), *, batch_size: int = 8, device=None,
                    max_length: int = 0, progress: bool = True) -> list[list[float]]:
    """Log-likelihood of each letter A-D for each question: a [len(questions)][4] list."""
    device = device or model_device(model)
    pad_id = pad_token_id(tokenizer)
    conts = letter_continuations(tokenizer)
    longest = max(len(c) for c in conts)
    limit = context_limit(model, max_length)
    prompts = encode_prompts(tokenizer, [build_prompt(q, shots) for q in questions])
    if limit is not None:  # keep the end of over-long prompts (the question, not the shots)
        prompts = [p[-(limit - longest + 1):] for p in prompts]

    # One row per distinct sequence "prompt + continuation[:-1]"; single-token letters share the
    # prompt row. uses[row] = [(question, letter), ...] scored from that row.
    rows: list[list[int]] = []
    uses: list[list[tuple[int, int]]] = []
    for qi, prompt in enumerate(prompts):
        seen: dict[tuple[int, ...], int] = {}
        for li, cont in enumerate(conts):
            key = tuple(cont[:-1])
            if key not in seen:
                seen[key] = len(rows)
                rows.append(prompt + cont[:-1])
                uses.append([])
            uses[seen[key]].append((qi, li))

    scores = [[float("-inf")] * len(LETTERS) for _ in questions]
    bar = tqdm(total=len(rows), desc="mmlu", unit="seq", disable=not progress, dynamic_ncols=True)
    for batch in batches_longest_first([len(r) for r in rows], batch_size):
        keep = max(len(conts[li]) for ri in batch for _, li in uses[ri])
        logprobs = forward_last_logprobs(model, [rows[ri] for ri in batch], keep, pad_id, device)
        for b, ri in enumerate(batch):
            for qi, li in uses[ri]:
                k = len(conts[li])
                scores[qi][li] = continuation_logprob(logprobs[b, keep - k:], conts[li])
        bar.update(len(batch))
    bar.close()
    return scores


def evaluate(model, tokenizer, questions: Sequence[MCQuestion], shots: Sequence[MCQuestion] = (),
             *, batch_size: int = 8, device=None, max_length: int = 0, progress: bool = True
             ) -> dict:
    """Accuracy over ``questions``; also returns the per-question choices."""
    scores = score_questions(model, tokenizer, questions, shots, batch_size=batch_size,
                             device=device, max_length=max_length, progress=progress)
    choices = [choose(s) for s in scores]
    correct = sum(c == q.answer for c, q in zip(choices, questions))
    return {"acc": correct / len(questions) if questions else None, "n": len(questions),
            "choices": choices, "scores": scores}


def run(context: BenchmarkContext) -> BenchmarkResult:
    records, shots, source = load_eval_data("mmlu", context.settings)
    result = evaluate(context.model, context.tokenizer, records, shots, **context.common)
    samples = [{"id": record_id(q.key), "choice": LETTERS[c], "answer": LETTERS[q.answer],
                "correct": c == q.answer} for q, c in zip(records, result["choices"])]
    return BenchmarkResult(result["acc"], result["n"], source, samples)
