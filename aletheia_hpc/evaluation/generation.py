"""Batched model calls shared by the benchmarks: left-padded forwards and greedy generation.

Both pad on the left by hand (the tokenizer's own padding side is never consulted or changed), pass
an attention mask and, for plain forwards, explicit position ids, so a padded row computes what
the same prompt computes alone. Prompts are processed longest first, so a batch holds prompts of
similar length and an out-of-memory error shows up on the first batch.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def context_limit(model: torch.nn.Module, max_length: int = 0) -> int | None:
    """The longest sequence to feed: ``max_length`` if set, else the config's positions limit."""
    if max_length:
        return max_length
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pad_token_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every token id that ends a generation: the tokenizer's eos and the model's configured ones."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if value is None:
            continue
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def batches_longest_first(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def forward_last_logprobs(model, rows: Sequence[Sequence[int]], keep: int, pad_id: int, device
                          ) -> torch.Tensor:
    """Log-softmax of the logits at the last ``keep`` positions of each (left-padded) row.

    Returns a float32 tensor [len(rows), keep, vocab]; row i's last position is index keep-1.
    """
    input_ids, attention_mask = left_pad(rows, pad_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep: compute all positions, then slice
        logits = model(**kwargs).logits
    return torch.log_softmax(logits[:, -keep:, :].float(), dim=-1)


class StopOnStrings(StoppingCriteria):
    """Marks a sequence finished once its generated text contains any of ``stop_strings``.

    Only the newest ``window`` generated tokens are decoded at each step: a stop string that just
    appeared ends within them. Returns one flag per sequence, so finished rows stop (and are padded)
    while the rest of the batch goes on.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.prompt_length = prompt_length
        self.window = max((len(s) for s in self.stop_strings), default=0) + 8

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop_strings:
            return done
        generated = input_ids[:, self.prompt_length:]
        tails = generated[:, -self.window:].tolist()
        for i, tail in enumerate(tails):
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(s in text for s in self.stop_strings):
                done[i] = True
        return done


def truncate_at_stop(text: str, stop_strings: Iterable[str]) -> str:
    """``text`` up to (excluding) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(prompts))["input_ids"]] if prompts else []


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int,
                    stop_strings: Sequence[str] = (), batch_size: int = 8, device=None,
                    max_length: int = 0, progress: bool = True, desc: str = "generate"
                    ) -> list[str]:
    """Greedy completions of ``prompts`` (in order), each cut at its first stop string or eos.

    ``prompts`` are strings, or token id lists used as they are (e.g. exactly the tokens a model
    was trained on). Batched with left padding and the KV cache; at most ``max_new_tokens`` new
    tokens. Prompts longer than the context limit minus ``max_new_tokens`` keep their last tokens.
    """
    device = device or model_device(model)
    pad_id = pad_token_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    limit = context_limit(model, max_length)
    if prompts and not isinstance(prompts[0], str):
        encoded = [list(p) for p in prompts]
    else:
        encoded = encode_prompts(tokenizer, prompts)
    if limit is not None:
        room = max(limit - max_new_tokens, 1)
        encoded = [ids[-room:] for ids in encoded]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
        eos_token_id=eos_ids or None, bos_token_id=getattr(tokenizer, "bos_token_id", None),
        temperature=None, top_p=None, top_k=None, use_cache=True)
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress, dynamic_ncols=True)
    for batch in batches_longest_first([len(e) for e in encoded], batch_size):
        input_ids, attention_mask = left_pad([encoded[i] for i in batch], pad_id, device)
        width = input_ids.shape[1]
        criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop_strings, width)])
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   generation_config=config, stopping_criteria=criteria)
        for row, index in zip(sequences[:, width:].tolist(), batch):
            for position, token in enumerate(row):
                if token in eos_ids:
                    row = row[:position]
                    break
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs[index] = truncate_at_stop(text, stop_strings)
        bar.update(len(batch))
    bar.close()
    return outputs
