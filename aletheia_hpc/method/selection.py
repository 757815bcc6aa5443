"""Layer selection: which layers get adapters, given the probe scores.

``select_layers`` applies a strategy that needs the scores alone; ``select_cost_aware`` also weighs
each candidate set's predicted step time (method/cost.py). Every strategy returns a sorted list of distinct layer indices and is deterministic: score ties
break towards the lower layer index, and the random baseline draws from its own seeded generator.
The number of layers is round(L * pct / 100), at least one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aletheia_hpc.method.cost import StepCostModel

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


class InfeasibleSpeedup(ValueError):
    """No layer set is predicted to reach the requested speedup."""


def select_cost_aware(scores: Sequence[float], cost: "StepCostModel", target_speedup: float = 1.5,
                      pct: float = 50.0) -> list[int]:
    """The layer set with the largest probe score mass among those of at most round(L * pct / 100)
    layers (aletheia's budget) whose predicted speedup over all-layer LoRA, ``cost.speedup``, is at
    least ``target_speedup``.

    Under the step-cost model a set's time depends only on its lowest layer m and its size k, so the
    search is exact: for every (m, k) the best set is m plus the k - 1 highest-scoring layers above
    m; among the (m, k) that meet the target, the largest score mass wins (ties: the faster set,
    then the higher m). When aletheia's own choice (the top k) is fast enough it is the answer.
    Raises InfeasibleSpeedup when even the fastest single layer misses the target."""
    if not scores:
        raise ValueError("no layer scores to select from")
    if len(scores) != cost.num_layers:
        raise ValueError(f"{len(scores)} layer scores for a cost model of {cost.num_layers} layers")
    if not target_speedup > 0:
        raise ValueError(f"target_speedup must be > 0, got {target_speedup}")
    scores = [float(s) for s in scores]
    total = len(scores)
    budget = layer_budget(total, pct)
    best, best_key = None, None
    for lowest in range(total):
        above = sorted(range(lowest + 1, total), key=lambda i: (-scores[i], i))
        for size in range(1, min(budget, total - lowest) + 1):
            layers = [lowest] + above[:size - 1]
            speedup = cost.speedup(layers)
            if speedup < target_speedup:
                continue
            key = (sum(scores[i] for i in layers), speedup, lowest)
            if best_key is None or key > best_key:
                best, best_key = layers, key
    if best is None:
        fastest = cost.speedup([total - 1])
        raise InfeasibleSpeedup(f"no layer set is predicted to reach a {target_speedup}x speedup over "
                                f"all-layer LoRA on this model and hardware (at most {fastest:.2f}x, with "
                                "the top layer alone); lower the target speedup")
    return sorted(best)
