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
log-likelihood, scored by :func:`aletheia_hpc.evaluation.choice.score_pairs`: with tokenizers that
encode each letter as one token (all the usual ones) one forward pass over the prompt scores all
four; a continuation of k>1 tokens is scored from one extra row (prompt + its first k-1 tokens).
Over-long prompts keep their end (the question, not the shots).
"""

from __future__ import annotations

from typing import Sequence

from aletheia_hpc.evaluation.benchmarks import BenchmarkContext, BenchmarkResult
from aletheia_hpc.evaluation.choice import score_pairs
from aletheia_hpc.evaluation.data import LETTERS, MCQuestion, load_eval_data, record_id
from aletheia_hpc.evaluation.generation import encode_prompts, pad_token_id
from aletheia_hpc.evaluation.scoring import choose

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


def score_questions(model, tokenizer, questions: Sequence[MCQuestion],
                    shots: Sequence[MCQuestion] = (), *, batch_size: int = 8, device=None,
                    max_length: int = 0, progress: bool = True) -> list[list[float]]:
    """Log-likelihood of each letter A-D for each question: a [len(questions)][4] list."""
    conts = letter_continuations(tokenizer)
    prompts = encode_prompts(tokenizer, [build_prompt(q, shots) for q in questions])
    pairs = [(prompt, cont) for prompt in prompts for cont in conts]
    flat = score_pairs(model, pairs, pad_token_id(tokenizer), batch_size=batch_size, device=device,
                       max_length=max_length, progress=progress, desc="mmlu")
    return [flat[i:i + len(LETTERS)] for i in range(0, len(flat), len(LETTERS))]


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
