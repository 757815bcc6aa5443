"""Instruction data: tokenized examples fit the window and always keep the response marker."""

import pytest

from aletheia_hpc.data.instructions import IGNORE_INDEX, fit_to_length, format_prompt, tokenize_records
from aletheia_hpc.models.tokenizer import tiny_tokenizer


@pytest.mark.parametrize("n_prompt, n_response, max_len, kept_prompt, kept_response", [
    (10, 5, 32, 10, 5),     # fits: untouched
    (40, 5, 32, 27, 5),     # long prompt: the response is whole, the prompt loses its middle
    (10, 40, 32, 10, 22),   # long response: the whole prompt stays, the response is cut at its end
    (40, 40, 32, 16, 16),   # both long: the response gets half the window
])
def test_fit_to_length_budgets(n_prompt, n_response, max_len, kept_prompt, kept_response):
    prompt, response = list(range(100, 100 + n_prompt)), list(range(500, 500 + n_response))
    p, r = fit_to_length(prompt, response, max_len, keep_head=1)
    assert (len(p), len(r)) == (kept_prompt, kept_response)
    assert len(p) + len(r) <= max_len
    assert p[0] == prompt[0] and p[-1] == prompt[-1]  # BOS and the prompt's end survive
    assert r == response[: len(r)]


def test_a_long_record_keeps_its_response_marker_and_labels_only_the_response():
    tok = tiny_tokenizer()
    record = {"instruction": "Summarise the text. " + "word " * 400, "input": "", "output": "A short summary."}
    marker = tok("### Response:\n", add_special_tokens=False)["input_ids"]
    (example,) = tokenize_records([record], tok, max_len=96)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) <= 96
    n_prompt = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    prompt, response = ids[:n_prompt], ids[n_prompt:]
    assert prompt[-len(marker):] == marker
    assert tok.decode(response).strip().startswith("A short summary.")
    assert response[-1] == tok.eos_token_id and labels[n_prompt:] == response
    if tok.bos_token_id is not None:
        assert ids[0] == tok.bos_token_id


def test_short_records_are_tokenized_whole():
    tok = tiny_tokenizer()
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    (example,) = tokenize_records([record], tok, max_len=256)
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    prompt = bos + tok(format_prompt(record), add_special_tokens=False)["input_ids"]
    assert example["input_ids"][: len(prompt)] == prompt
    assert example["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
