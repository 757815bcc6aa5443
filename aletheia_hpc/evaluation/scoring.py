"""Pure scoring functions: answer-letter log-likelihoods (MMLU) and final numbers (GSM8K)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Sequence

import torch

# ----------------------------------------------------------------------------- MMLU


def continuation_logprob(logprobs: torch.Tensor, continuation: Sequence[int]) -> float:
    """Sum of log p(token_j) for a continuation of k tokens.

    ``logprobs`` holds k rows of log-probabilities over the vocabulary: row j is the model's
    distribution for the j-th continuation token (i.e. the positions from the last prompt token
    up to the second-to-last continuation token).
    """
    if logprobs.shape[0] != len(continuation):
        raise ValueError(f"{logprobs.shape[0]} logit rows for a {len(continuation)}-token continuation")
    index = torch.as_tensor(list(continuation), dtype=torch.long, device=logprobs.device)
    return float(logprobs.gather(1, index[:, None]).sum())


def choose(scores: Sequence[float]) -> int:
    """Index of the highest score; the first one on a tie."""
    best = 0
    for i, score in enumerate(scores):
        if score > scores[best]:
            best = i
    return best


def letter_choice(last_logits: torch.Tensor, letter_ids: Sequence[int]) -> int:
    """The answer a single position's logits pick among single-token letters (" A".." D")."""
    logprobs = torch.log_softmax(last_logits.float(), dim=-1)
    return choose([float(logprobs[i]) for i in letter_ids])


# ----------------------------------------------------------------------------- GSM8K

# A number token is bounded on both sides: not preceded by a letter, digit, "." or ",", not
# followed by a letter or digit, nor by "." or "," and a digit (so "1,2345" is one token, never
# "1,234" and "5"). Digits joined by commas are a number only when grouped in thousands
# ("1,234,567"); otherwise ("1,2345", "2,50", "1,2,3") the token is ambiguous and is no number.
_TOKEN = r"-?(?:\d[\d,]*\d|\d)(?:\.\d+)?|-?\.\d+"
_BOUNDED = rf"(?<![\w.,])(?:{_TOKEN})(?![\w]|[.,]\d)"
_NUMBER_RE = re.compile(_BOUNDED)
_HASHES_RE = re.compile(rf"####\s*\$?\s*({_BOUNDED})")
_ANSWER_IS_RE = re.compile(rf"answer is\s*:?\s*\$?\s*\\?\(?\s*(?:\\boxed\{{)?\s*({_BOUNDED})",
                           re.IGNORECASE)
_GROUPED_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+")


def normalize_number(text: str) -> Decimal | None:
    """Decimal value of a number string ("1,234", "-3.50", "$7", "12.") or None, also for
    commas that do not group thousands ("1,2345", "2,50")."""
    cleaned = text.strip().replace("$", "").rstrip(".")
    integer = cleaned.split(".")[0]
    if "," in integer and not _GROUPED_RE.fullmatch(integer):
        return None
    try:
        value = Decimal(cleaned.replace(",", ""))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_number(text: str) -> Decimal | None:
    """The final answer a text states, as a Decimal, or None when it states no number.

    Priority: the number after the last ``####``; else after the last "The answer is"; else the
    last number in the text. Thousands separators, a leading ``$``, negative signs and decimals
    are understood, so ``1,234`` == ``1234`` and ``3.50`` == ``3.5``; an ambiguous token such as
    ``2,50`` (a decimal comma? a list?) states no number, so it never matches.
    """
    for pattern in (_HASHES_RE, _ANSWER_IS_RE):
        matches = pattern.findall(text)
        if matches:
            return normalize_number(matches[-1])
    for match in reversed(_NUMBER_RE.findall(text)):
        value = normalize_number(match)
        if value is not None:
            return value
    return None


def gsm8k_target(answer: str) -> Decimal:
    """The reference number of a GSM8K worked answer (the number after ``####``)."""
    value = extract_number(answer)
    if value is None:
        raise ValueError(f"GSM8K reference answer has no number: {answer!r}")
    return value


def numbers_match(predicted: Decimal | None, target: Decimal | None) -> bool:
    """Exact numeric equality; no number on either side never matches."""
    return predicted is not None and target is not None and predicted == target


def gsm8k_correct(generation: str, answer: str) -> bool:
    """Whether a generated solution's final number equals the reference's ``####`` number."""
    return numbers_match(extract_number(generation), gsm8k_target(answer))
