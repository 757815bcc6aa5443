"""GSM8K: greedy generation, final-number extraction, exact match against the ``####`` answer.

Prompt (k-shot worked examples, then the question)::

    Question: <shot question>
    Answer: <worked solution ending in #### 42>

    Question: <question>
    Answer:

Generation stops at the next "Question:" (the model starting another example), three newlines,
eos, or ``max_new_tokens``. The prediction is the number after the last ``####``, else after the
last "The answer is", else the last number in the completion (see :mod:`.scoring`; numbers are
bounded on both sides, and digits joined by commas count only when grouped in thousands).

Few-shot (``eval.gsm8k_shots``, e.g. 5): the prompt layout is lm-evaluation-harness's ``gsm8k``
task ("Question: ...\nAnswer: <worked solution>" examples joined by a blank line, 5-shot there).
Unlike lm-evaluation-harness, whose examples come from the train split, ours are test records
outside the evaluated subset (the offline copy has no train split), chosen by ``subset_seed``.

What the paper's protocol leaves open, and what we chose: the number of shots (default 0; 5 is
offered), the prompt template (above), whether a chat template is applied (no), greedy decoding
(yes) and the generation cap (``eval.gsm8k_max_new_tokens``, 256), the answer extraction (above:
lm-evaluation-harness's "strict" match reads only ``####``, its "flexible" one the last number;
we take ``####``, then "The answer is", then the last number), which 200 questions form the
subset (a hash of each question with ``eval.subset_seed``), and the split (test).
"""

from __future__ import annotations

from typing import Sequence

from aletheia_hpc.evaluation.benchmarks import BenchmarkContext, BenchmarkResult
from aletheia_hpc.evaluation.data import MathProblem, load_eval_data, record_id
from aletheia_hpc.evaluation.generation import generate_greedy
from aletheia_hpc.evaluation.scoring import extract_number, gsm8k_target, numbers_match

STOP_STRINGS = ("Question:", "\n\n\n")


def format_example(p: MathProblem, with_answer: bool = False) -> str:
    text = f"Question: {p.question.strip()}\nAnswer:"
    if with_answer:
        text += f" {p.answer.strip()}\n\n"
    return text


def build_prompt(p: MathProblem, shots: Sequence[MathProblem] = ()) -> str:
    return "".join(format_example(s, with_answer=True) for s in shots) + format_example(p)


def evaluate(model, tokenizer, problems: Sequence[MathProblem], shots: Sequence[MathProblem] = (),
             *, max_new_tokens: int = 256, batch_size: int = 8, device=None, max_length: int = 0,
             progress: bool = True) -> dict:
    """Exact-match accuracy over ``problems``; also returns completions and predictions."""
    prompts = [build_prompt(p, shots) for p in problems]
    completions = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                  stop_strings=STOP_STRINGS, batch_size=batch_size, device=device,
                                  max_length=max_length, progress=progress, desc="gsm8k")
    predictions = [extract_number(c) for c in completions]
    correct = [numbers_match(pred, gsm8k_target(p.answer)) for pred, p in zip(predictions, problems)]
    return {"acc": sum(correct) / len(problems) if problems else None, "n": len(problems),
            "completions": completions, "predictions": predictions, "correct": correct}


def run(context: BenchmarkContext) -> BenchmarkResult:
    records, shots, source = load_eval_data("gsm8k", context.settings)
    result = evaluate(context.model, context.tokenizer, records, shots,
                      max_new_tokens=context.settings.gsm8k_max_new_tokens, **context.common)
    samples = [{"id": record_id(p.key), "generation": g, "prediction": None if v is None else str(v),
                "target": str(gsm8k_target(p.answer)), "correct": c}
               for p, g, v, c in zip(records, result["completions"], result["predictions"],
                                     result["correct"])]
    return BenchmarkResult(result["acc"], result["n"], source, samples)
