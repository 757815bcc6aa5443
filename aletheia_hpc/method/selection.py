"""Layer selection: which layers get adapters, given the probe scores.

Every strategy returns a sorted list of distinct layer indices and is deterministic: score ties
break towards the lower layer index, and the random baseline draws from its own seeded generator.
The number of layers is round(L * pct / 100), at least one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

STRATEGIES: dict[str, Callable[[Sequence[float], int, int], list[int]]] = {}


def _strategy(name: str):
    def register(fn):
        STRATEGIES[name] = fn
        return fn
    return register


@_strategy("top")
def _top(scores, k, seed):
    """The paper's rule: the k highest-scoring layers."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


@_strategy("bottom")
def _bottom(scores, k, seed):
    """Baseline a referee asked for: the k lowest-scoring layers."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k]


@_strategy("random")
def _random(scores, k, seed):
    """Baseline: k layers drawn uniformly, reproducible from the seed."""
    return random.Random(seed).sample(range(len(scores)), k)


@_strategy("last")
def _last(scores, k, seed):
    """Depth baseline: the k layers nearest the output (ignores the scores)."""
    return list(range(len(scores) - k, len(scores)))


@_strategy("middle")
def _middle(scores, k, seed):
    """Depth control: the k layers centred in the stack (ignores the scores); an odd remainder
    leaves the extra layer at the bottom."""
    start = (len(scores) - k + 1) // 2
    return list(range(start, start + k))


def layer_budget(num_layers: int, pct: float) -> int:
    """How many layers pct% of num_layers is: round half up, at least one."""
    if not 0 < pct <= 100:
        raise ValueError(f"top-k percentage must be in (0, 100], got {pct}")
    return max(1, int(num_layers * pct / 100 + 0.5))


def select_layers(scores: Sequence[float], pct: float = 50.0, strategy: str = "top", seed: int = 0) -> list[int]:
    """Sorted indices of the layers chosen by ``strategy`` from ``scores`` (index = layer)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"selection strategy {strategy!r} is not one of {sorted(STRATEGIES)}")
    if not scores:
        raise ValueError("no layer scores to select from")
    return sorted(STRATEGIES[strategy](list(scores), layer_budget(len(scores), pct), seed))
