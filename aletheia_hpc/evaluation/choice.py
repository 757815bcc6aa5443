"""Multiple choice by log-likelihood, as lm-evaluation-harness scores ``output_type: multiple_choice``.

Each choice is a continuation of the question's context after one space. Its log-likelihood is
the sum of log p(token) over the continuation's tokens, which are found as lm-eval finds them:
trailing whitespace of the context moves to the continuation, the whole text is encoded, and the
continuation is what follows the context's own tokens. A sequence longer than the context limit
keeps its last tokens.

acc: the choice with the highest log-likelihood is right. acc_norm: the same after dividing each
log-likelihood by the choice's length in characters (lm-eval's ``acc_norm``). Ties go to the first
choice, as ``numpy.argmax`` does.

One forward row per distinct ``context + continuation[:-1]``: choices that share it (MMLU's
single-token letters) are scored from the same row.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from aletheia_hpc.evaluation.benchmarks import BenchmarkContext, BenchmarkResult
from aletheia_hpc.evaluation.data import ChoiceQuestion, load_eval_data, record_id
from aletheia_hpc.evaluation.generation import (batches_longest_first, context_limit,
                                                forward_last_logprobs, model_device, pad_token_id)
from aletheia_hpc.evaluation.scoring import choose, continuation_logprob

TARGET_DELIMITER = " "  # lm-eval's default between the context and a choice


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) split as lm-eval's causal models split them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer.encode(context + continuation))
    head = list(tokenizer.encode(context))
    return head, whole[len(head):]


@torch.inference_mode()
def score_pairs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, *,
                batch_size: int = 8, device=None, max_length: int = 0, progress: bool = True,
                desc: str = "choices") -> list[float]:
    """The log-likelihood of each (context tokens, continuation tokens) pair's continuation."""
    device = device or model_device(model)
    limit = context_limit(model, max_length)
    rows: list[list[int]] = []
    uses: list[list[int]] = []  # uses[row] = the pairs scored from that row
    seen: dict[tuple[int, ...], int] = {}
    for pi, (head, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"choice {pi} encodes as no tokens after its context")
        row = (list(head) + list(cont))[:-1]
        if limit is not None:
            row = row[-limit:]
        key = tuple(row)
        if key not in seen:
            seen[key] = len(rows)
            rows.append(row)
            uses.append([])
        uses[seen[key]].append(pi)
    scores = [float("-inf")] * len(pairs)
    bar = tqdm(total=len(rows), desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)
    for batch in batches_longest_first([len(r) for r in rows], batch_size):
        keep = max(min(len(pairs[pi][1]), len(rows[ri])) for ri in batch for pi in uses[ri])
        logprobs = forward_last_logprobs(model, [rows[ri] for ri in batch], keep, pad_id, device)
        for b, ri in enumerate(batch):
            for pi in uses[ri]:
                cont = list(pairs[pi][1])[-len(rows[ri]):]  # a continuation longer than the limit
                scores[pi] = continuation_logprob(logprobs[b, keep - len(cont):], cont)
        bar.update(len(batch))
    bar.close()
    return scores


def evaluate(model, tokenizer, questions: Sequence[ChoiceQuestion], *, batch_size: int = 8,
             device=None, max_length: int = 0, progress: bool = True, desc: str = "choices") -> dict:
    """acc, acc_norm, n, and per question the log-likelihoods and both choices."""
    pairs, owner = [], []
    for qi, q in enumerate(questions):
        for choice in q.choices:
            pairs.append(encode_pair(tokenizer, q.context, TARGET_DELIMITER + choice))
            owner.append(qi)
    flat = score_pairs(model, pairs, pad_token_id(tokenizer), batch_size=batch_size, device=device,
                       max_length=max_length, progress=progress, desc=desc)
    scores: list[list[float]] = [[] for _ in questions]
    for qi, score in zip(owner, flat):
        scores[qi].append(score)
    choices = [choose(s) for s in scores]
    # lm-eval divides by the choice's length without the delimiter
    choices_norm = [choose([s / len(c) for s, c in zip(row, q.choices)]) for row, q in zip(scores, questions)]
    n = len(questions)
    return {"acc": sum(c == q.answer for c, q in zip(choices, questions)) / n if n else None,
            "acc_norm": sum(c == q.answer for c, q in zip(choices_norm, questions)) / n if n else None,
            "n": n, "scores": scores, "choices": choices, "choices_norm": choices_norm}


def run(context: BenchmarkContext) -> BenchmarkResult:
    name = context.benchmark
    records, _, source = load_eval_data(name, context.settings)
    result = evaluate(context.model, context.tokenizer, records, desc=name, **context.common)
    samples = [{"id": record_id(q.key), "choice": c, "choice_norm": cn, "answer": q.answer,
                "correct": c == q.answer, "correct_norm": cn == q.answer}
               for q, c, cn in zip(records, result["choices"], result["choices_norm"])]
    return BenchmarkResult(result["acc"], result["n"], source, samples,
                           fields={f"{name}_acc_norm": result["acc_norm"]})
