"""The project's own instruction set: deterministic, offline, Alpaca-format.

The paper trained on an unpublished Alpaca-style set ("Aletheia Bootstrap"). This set stands in for
it so that every campaign runs without a hub: short instruction-following tasks with one correct
answer each (arithmetic, string edits, sorting, counting, conversions, rewriting), so that a model
can measurably learn them in a few hundred steps and a held-out split measures that learning.
The same seed always yields the same records, on every machine.
"""

from __future__ import annotations

import random

BUILTIN_NAME = "builtin"

_WORDS = (
    "river stone cloud garden lantern mirror harbor violin candle meadow falcon orchard thunder "
    "pepper castle silver window forest engine planet ribbon marble winter canyon copper rocket "
    "island ladder puzzle shadow temple velvet wizard yellow basket circle dragon feather glacier"
).split()
_NAMES = "Ada Bruno Chen Dara Emil Farah Goran Hana Ivo Jun Kira Lena Mateo Nia Omar Pia".split()
_UNITS = (("kilometers", "meters", 1000), ("hours", "minutes", 60), ("kilograms", "grams", 1000),
          ("minutes", "seconds", 60), ("meters", "centimeters", 100))


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op, value = rng.choice((("plus", a + b), ("minus", a - b), ("times", a * b)))
    return {"instruction": f"What is {a} {op} {b}? Answer with the number only.", "input": "",
            "output": str(value)}


def _reverse(rng: random.Random) -> dict:
    words = rng.sample(_WORDS, rng.randint(3, 6))
    return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
            "output": " ".join(reversed(words))}


def _sort(rng: random.Random) -> dict:
    words = rng.sample(_WORDS, rng.randint(3, 6))
    return {"instruction": "Sort these words alphabetically, separated by commas.",
            "input": ", ".join(words), "output": ", ".join(sorted(words))}


def _uppercase(rng: random.Random) -> dict:
    words = rng.sample(_WORDS, rng.randint(2, 5))
    return {"instruction": "Rewrite the text in capital letters.", "input": " ".join(words),
            "output": " ".join(words).upper()}


def _count(rng: random.Random) -> dict:
    word = rng.choice(_WORDS)
    letter = rng.choice(sorted(set(word)))
    return {"instruction": f"How many times does the letter '{letter}' appear in the word?",
            "input": word, "output": str(word.count(letter))}


def _convert(rng: random.Random) -> dict:
    big, small, factor = rng.choice(_UNITS)
    amount = rng.randint(2, 40)
    return {"instruction": f"Convert {amount} {big} to {small}.", "input": "",
            "output": f"{amount * factor} {small}"}


def _story(rng: random.Random) -> dict:
    name, thing = rng.choice(_NAMES), rng.choice(_WORDS)
    have, give = rng.randint(5, 30), rng.randint(1, 4)
    return {"instruction": "Solve the word problem and give the final number.",
            "input": f"{name} has {have} {thing}s and gives away {give}. How many are left?",
            "output": f"{name} has {have} - {give} = {have - give} {thing}s left. "
                      f"The answer is {have - give}."}


def _max(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 500), rng.randint(3, 7))
    return {"instruction": "Which number is the largest?", "input": " ".join(map(str, numbers)),
            "output": str(max(numbers))}


_TASKS = (_arithmetic, _reverse, _sort, _uppercase, _count, _convert, _story, _max)


def builtin_records(n: int = 4000, seed: int = 0) -> list[dict]:
    """``n`` Alpaca-format records (instruction, input, output), the same for the same seed."""
    rng = random.Random(seed)
    return [_TASKS[i % len(_TASKS)](rng) for i in range(n)]
