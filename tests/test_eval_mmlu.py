"""MMLU scoring on a tiny model: batched == unbatched, and equal to a naive unpadded reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aletheia_hpc.evaluation import mmlu
from aletheia_hpc.evaluation.data import MCQuestion, load_benchmark
from aletheia_hpc.models.tiny import build_tiny_model
from aletheia_hpc.models.tokenizer import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def questions():
    records, _ = load_benchmark("mmlu", "local", str(FIXTURES))
    # prompts of quite different lengths, so batches need padding
    long = MCQuestion("Read carefully. " * 12 + "Which is the largest?", ("1", "22", "333", "4444"), 3)
    return records + [long]


def _reference_scores(model, tokenizer, question, shots=()):
    """Each letter's log-likelihood from one unpadded forward of prompt + continuation."""
    prompt = tokenizer(mmlu.build_prompt(question, shots))["input_ids"]
    scores = []
    for letter in "ABCD":
        cont = tokenizer.encode(" " + letter, add_special_tokens=False)
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        scores.append(sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(cont)))
    return scores


def test_prompt_format():
    q = MCQuestion("What is 2 + 3?", ("4", "5", "6", "7"), 1)
    shot = MCQuestion("1 + 1?", ("2", "3", "4", "5"), 0)
    assert mmlu.build_prompt(q) == (mmlu.HEADER + "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    assert mmlu.build_prompt(q, [shot]).startswith(
        mmlu.HEADER + "1 + 1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\nWhat is 2 + 3?")


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_batched_equals_unbatched_equals_reference(family, tokenizer, questions):
    model = build_tiny_model(family, num_layers=2, seed=3).eval()
    # the tiny tokenizer splits some letters in two tokens: both scoring paths are exercised
    lengths = {len(c) for c in mmlu.letter_continuations(tokenizer)}
    assert lengths == {1, 2}
    batched = mmlu.score_questions(model, tokenizer, questions, batch_size=4, progress=False)
    single = mmlu.score_questions(model, tokenizer, questions, batch_size=1, progress=False)
    reference = [_reference_scores(model, tokenizer, q) for q in questions]
    for b, s, r in zip(batched, single, reference):
        assert b == pytest.approx(r, abs=1e-4)
        assert s == pytest.approx(r, abs=1e-4)
    choices_b = [mmlu.choose(s) for s in batched]
    assert choices_b == [mmlu.choose(s) for s in single] == [mmlu.choose(s) for s in reference]


def test_shots_and_accuracy(tokenizer, questions):
    model = build_tiny_model("llama", num_layers=2, seed=5).eval()
    shots = questions[4:6]
    result = mmlu.evaluate(model, tokenizer, questions[:4], shots, batch_size=3, progress=False)
    reference = [_reference_scores(model, tokenizer, q, shots) for q in questions[:4]]
    assert result["choices"] == [mmlu.choose(r) for r in reference]
    assert result["n"] == 4
    assert result["acc"] == sum(c == q.answer for c, q in zip(result["choices"], questions[:4])) / 4


def test_over_long_prompts_keep_their_end(tokenizer, questions):
    model = build_tiny_model("llama", num_layers=1, seed=1).eval()
    huge = MCQuestion("word " * 2000 + "Which?", ("a", "b", "c", "d"), 0)
    scores = mmlu.score_questions(model, tokenizer, [huge], batch_size=1, progress=False,
                                  max_length=64)
    assert all(torch.isfinite(torch.tensor(s)).all() for s in scores)
