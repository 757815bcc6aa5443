"""Pure scoring functions against hand-worked examples."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
import torch

from aletheia_hpc.evaluation.scoring import (choose, continuation_logprob, extract_number,
                                             gsm8k_correct, gsm8k_target, letter_choice,
                                             numbers_match)


def test_letter_choice_on_hand_built_logits():
    # vocabulary of 6; letters " A".." D" are ids 2, 3, 4, 5
    logits = torch.tensor([9.0, 8.0, 1.0, 0.5, 3.0, 2.9])
    assert letter_choice(logits, [2, 3, 4, 5]) == 2  # C: the highest among the letters only
    logits[3] = 3.5
    assert letter_choice(logits, [2, 3, 4, 5]) == 1  # now B
    tied = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert letter_choice(tied, [2, 3, 4, 5]) == 0  # tie -> first letter
    assert choose([-3.0, -1.0, -1.0, -2.0]) == 1


def test_continuation_logprob_sums_the_right_entries():
    # two-token continuation [1, 0] over a vocabulary of 3
    logprobs = torch.log(torch.tensor([[0.2, 0.5, 0.3],    # distribution for token 1 of the cont
                                       [0.6, 0.3, 0.1]]))  # for token 2
    assert continuation_logprob(logprobs, [1, 0]) == pytest.approx(math.log(0.5) + math.log(0.6))
    assert continuation_logprob(logprobs[:1], [2]) == pytest.approx(math.log(0.3))
    with pytest.raises(ValueError):
        continuation_logprob(logprobs, [1])


@pytest.mark.parametrize("text, expected", [
    ("She has 1,234 apples.", "1234"),
    ("The total is $1,234,567.89 in all", "1234567.89"),
    ("It dropped to -5 degrees", "-5"),
    ("He pays 3.50 dollars", "3.5"),
    ("He pays $3.50.", "3.50"),
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18", "18"),
    ("blah #### 1,000", "1000"),
    ("####-7", "-7"),
    ("First 5, then 6, so the answer is 11. Check: 11 + 2 = 13", "11"),
    ("The answer is: $42", "42"),
    ("the answer is -0.5", "-0.5"),
    ("We get 12 + 30 = 42 cookies", "42"),
    ("values 1, 2, 3", "3"),
    ("1,2345 or rather 7", "7"),  # the ambiguous token is skipped, the last clear number taken
    ("It costs 12.5.", "12.5"),
    ("#### 1,234,567", "1234567"),
    ("half is .5", "0.5"),
    ("x2 y3 and 7", "7"),
])
def test_extract_number(text, expected):
    assert extract_number(text) == Decimal(expected)


@pytest.mark.parametrize("text", ["", "no number here", "The answer is unknown", "####",
                                  # commas that do not group thousands state no number
                                  "#### 1,2345", "#### 2,50", "The answer is 2,50", "1,2345",
                                  "values 1,2,3", "#### 12,34,567", "abc12 x3y"])
def test_extract_number_none(text):
    assert extract_number(text) is None


def test_numbers_are_bounded_on_both_sides():
    assert extract_number("#### 1,2345") != Decimal(1234)
    assert extract_number("2,50") != Decimal(50)
    assert extract_number("answer: 12km") is None  # no number glued to a word
    assert extract_number("#### 7 apples") == Decimal(7)
    assert extract_number("3-5 = -2") == Decimal(-2)


def test_decimal_equality_and_no_number_never_matches():
    assert numbers_match(extract_number("3.50"), extract_number("3.5"))
    assert numbers_match(extract_number("18.00"), Decimal(18))
    assert not numbers_match(None, Decimal(0))
    assert not numbers_match(None, None)
    assert not numbers_match(extract_number("-5"), extract_number("5"))


def test_gsm8k_correct_against_reference_answers():
    reference = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18"
    assert gsm8k_target(reference) == 18
    assert gsm8k_correct(" She makes 9 * 2 = $18 every day.", reference)
    assert gsm8k_correct(" ... The answer is 18.", reference)
    assert gsm8k_correct(" ... #### 18", reference)
    assert not gsm8k_correct(" She makes 9 * 2 = $19", reference)
    assert not gsm8k_correct(" I do not know.", reference)
    assert gsm8k_correct("It costs 1,500 dollars", "#### 1500")
    assert gsm8k_correct("The answer is -2", "-2")  # a bare-number reference (local format)
    with pytest.raises(ValueError):
        gsm8k_target("no number")
