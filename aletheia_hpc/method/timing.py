"""Interleaved timing of training steps: how this project compares the step times of several arms.

Timing each arm in its own run (or its own job) lets a load that changes on a shared machine, a
thermal state, or simply another node decide the ratio. ``time_interleaved`` instead runs one step
of every arm per round, rotating which arm goes first, so that whatever changes over the run hits
every arm alike; the first ``warmup`` rounds (caches, allocator, optimizer state) are not timed.
The step-cost calibration (method/cost.py), the paired timing cell of a campaign
(``campaign.timing=paired``) and the benchmarks all time their arms here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: Mapping[str, Callable[[int], object]],
    *,
    rounds: int,
    warmup: int = 1,
    device: torch.device | None = None,
    around: Callable[[str], AbstractContextManager] | None = None,
    before_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per step of every arm, timed interleaved; ``{arm: [one time per timed round]}``.

    ``steps[arm](i)`` runs one training step of that arm in round ``i`` (0-based, warm-up rounds
    included, so that every arm can take the same batch in the same round). Round ``i`` runs every
    arm once, starting with the ``i mod n``-th, in the mapping's order. ``around(arm)``, when given,
    is entered before each step of that arm and left after it, outside the timed span (calibration
    wraps the model with that arm's adapters there). On CUDA, ``device`` is synchronised before
    and after each timed span, so that a step's queued kernels count towards it. ``before_round(i)``,
    when given, is called before round ``i``, untimed; whatever it raises ends the timing (a stop
    request, for instance).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"interleaved timing needs rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    names = list(steps)
    if not names:
        raise ValueError("no arms to time")
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        if before_round is not None:
            before_round(i)
        start = i % len(names)
        for name in names[start:] + names[:start]:
            with around(name) if around is not None else nullcontext():
                _sync(device)
                t0 = time.perf_counter()
                steps[name](i)
                _sync(device)
                elapsed = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(elapsed)
    return times
