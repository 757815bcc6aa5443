"""Batched greedy generation with stop strings and a token cap (GSM8K, HumanEval) on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aletheia_hpc.evaluation import gsm8k
from aletheia_hpc.evaluation.data import load_benchmark
from aletheia_hpc.evaluation.generation import (StopOnStrings, generate_greedy, left_pad,
                                                truncate_at_stop)
from aletheia_hpc.models.tiny import build_tiny_model
from aletheia_hpc.models.tokenizer import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", num_layers=2, seed=11).eval()


@pytest.fixture(scope="module")
def prompts():
    problems, _ = load_benchmark("gsm8k", "local", str(FIXTURES))
    return [gsm8k.build_prompt(p) for p in problems]


def _naive_greedy(model, tokenizer, prompt, max_new_tokens):
    """Reference: one unpadded sequence, full recompute each step (no cache), argmax."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return new


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_truncate_at_stop():
    assert truncate_at_stop(" 18.\n\nQuestion: next", ["Question:", "\n\n\n"]) == " 18.\n\n"
    assert truncate_at_stop("    return x\ndef g():\n#", ["\n#", "\ndef "]) == "    return x"
    assert truncate_at_stop("no stop", ["\nclass "]) == "no stop"


def test_stop_criterion_flags_each_row(tokenizer):
    rows = [tokenizer.encode("Answer: 4\n\nQuestion: what", add_special_tokens=False),
            tokenizer.encode("Answer: 4 and more text", add_special_tokens=False)]
    prompt = tokenizer.encode("P: ", add_special_tokens=False)
    width = max(len(r) for r in rows)
    batch = torch.tensor([prompt + [0] * (width - len(r)) + r for r in rows])
    # the padding sits inside the "generated" part here, decoded as the pad special token -> skipped
    flags = StopOnStrings(tokenizer, ["Question:"], prompt_length=len(prompt))(batch, None)
    assert flags.tolist() == [True, False]
    assert StopOnStrings(tokenizer, [], 0)(batch, None).tolist() == [False, False]


def test_batched_equals_unbatched_equals_naive(model, tokenizer, prompts):
    cap = 12
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=cap, batch_size=4,
                              progress=False)
    single = generate_greedy(model, tokenizer, prompts, max_new_tokens=cap, batch_size=1,
                             progress=False)
    assert batched == single
    for prompt, text in zip(prompts, batched):
        expected = tokenizer.decode(_naive_greedy(model, tokenizer, prompt, cap),
                                    skip_special_tokens=True)
        assert text == expected  # the reference stops after exactly `cap` tokens (or eos)


def test_stop_string_ends_generation_early(model, tokenizer, prompts):
    free = generate_greedy(model, tokenizer, prompts[:3], max_new_tokens=24, batch_size=3,
                           progress=False)
    # pick, for the first prompt, a stop string the model does produce in the middle of its output
    text = free[0]
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip())
    stopped = generate_greedy(model, tokenizer, prompts[:3], max_new_tokens=24, batch_size=3,
                              stop_strings=[stop], progress=False)
    assert stopped[0] == text[:text.index(stop)]
    for full, cut in zip(free, stopped):
        assert cut == (full[:full.index(stop)] if stop in full else full)
    # and the same with one prompt at a time
    assert generate_greedy(model, tokenizer, prompts[:3], max_new_tokens=24, batch_size=1,
                           stop_strings=[stop], progress=False) == stopped


def test_gsm8k_evaluate_on_tiny_model(model, tokenizer):
    problems, _ = load_benchmark("gsm8k", "local", str(FIXTURES))
    result = gsm8k.evaluate(model, tokenizer, problems, problems[:1], max_new_tokens=8,
                            batch_size=2, progress=False)
    assert result["n"] == len(problems) and len(result["completions"]) == len(problems)
    assert all("Question:" not in c for c in result["completions"])
    assert result["acc"] == sum(result["correct"]) / len(problems)


@pytest.mark.parametrize("family", ["gpt_neox", "qwen2"])
def test_other_families_batched_equals_unbatched(family, tokenizer, prompts):
    model = build_tiny_model(family, num_layers=2, seed=2).eval()
    batched = generate_greedy(model, tokenizer, prompts[:3], max_new_tokens=8, batch_size=3,
                              progress=False)
    single = generate_greedy(model, tokenizer, prompts[:3], max_new_tokens=8, batch_size=1,
                             progress=False)
    assert batched == single
