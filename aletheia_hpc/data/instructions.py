"""Alpaca-format instruction data: loading, a fixed held-out split, prompt formatting, tokenization.

A record has ``instruction``, optional ``input`` and ``output``. The loss covers the response
tokens (and the closing end-of-sequence token) only; prompt and padding positions carry label -100.
The held-out split depends on ``split_seed`` alone, so every cell of a campaign, whatever its
recipe or training seed, is evaluated on the same records.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from aletheia_hpc.data.builtin import BUILTIN_NAME, builtin_records

IGNORE_INDEX = -100

TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task{with_input}. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}"
        "### Response:\n"
    ),
}


class DataError(ValueError):
    pass


def load_records(source: str, builtin_size: int = 4000) -> list[dict]:
    """Records from 'builtin', a local .jsonl / .json file, or 'hub:<dataset id>' (train split)."""
    if source == BUILTIN_NAME:
        records = builtin_records(builtin_size)
    elif source.startswith("hub:"):
        try:
            import datasets
        except ImportError as exc:
            raise DataError("data.source=hub:... needs the 'datasets' package: "
                            "pip install 'aletheia-hpc[hub]'") from exc
        records = [dict(r) for r in datasets.load_dataset(source[4:], split="train")]
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data.source={source!r}: no such file")
        text = path.read_text()
        try:
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"data.source={source!r}: not valid JSON ({exc})") from exc
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not record.get("instruction") or "output" not in record:
            raise DataError(f"data.source={source!r}: record {i} lacks 'instruction' or 'output' "
                            "(Alpaca format: instruction, input, output)")
    return records


def split_records(records: list[dict], eval_size: int, split_seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) with a held-out set fixed by split_seed."""
    if eval_size >= len(records):
        raise DataError(f"data.eval_size={eval_size} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(split_seed).shuffle(order)
    held_out = set(order[:eval_size])
    train = [r for i, r in enumerate(records) if i not in held_out]
    return train, [records[i] for i in sorted(held_out)]


def format_prompt(record: dict, template: str = "alpaca") -> str:
    if template not in TEMPLATES:
        raise DataError(f"data.template={template!r} is not one of {sorted(TEMPLATES)}")
    extra = record.get("input") or ""
    return TEMPLATES[template].format(
        instruction=record["instruction"],
        with_input=", paired with an input that provides further context" if extra else "",
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )


def fit_to_length(prompt: list[int], response: list[int], max_len: int, keep_head: int) -> tuple[list[int], list[int]]:
    """(prompt, response) cut to at most ``max_len`` tokens together.

    The response keeps whatever the whole prompt leaves, but never less than half the window; the
    prompt then loses tokens from its middle: its first ``keep_head`` tokens (BOS) and its end, which
    carries the template's response marker, always stay, so a trained or scored sequence never has
    its response start without the marker."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    response = response[: max(max_len - len(prompt), max_len // 2)]
    budget = max_len - len(response)
    if len(prompt) > budget:
        tail = max(budget - keep_head, 0)
        prompt = prompt[:keep_head] + (prompt[len(prompt) - tail:] if tail else [])
    return prompt, response


def tokenize_records(records: list[dict], tokenizer, max_len: int, template: str = "alpaca") -> list[dict]:
    """input_ids + labels per record, at most ``max_len`` tokens (see ``fit_to_length``)."""
    examples = []
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    for record in records:
        prompt = bos + tokenizer(format_prompt(record, template), add_special_tokens=False)["input_ids"]
        response = tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"]
        prompt, response = fit_to_length(prompt, response + [tokenizer.eos_token_id], max_len, len(bos))
        examples.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
    return examples


@dataclass
class PadCollator:
    """Right-pads a list of tokenized examples into a batch; padding is masked out of the loss."""
    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch  # here, not at the top: plan-time validation reads TEMPLATES without torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
