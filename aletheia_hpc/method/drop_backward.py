"""Probe-guided backward dropping: each optimizer step detaches some sublayers (attention, MLP) of
the adapted layers, so that backward skips them and the residual stream carries the gradient on
(DropBP, NeurIPS 2024). A dropped sublayer's forward is unchanged; its adapters get no gradient
that step, and AdamW leaves them alone (their gradient is None).

The rule (docs/drop_backward.md writes it out):

* every adapted layer ``l`` gets one keep probability ``q_l``, shared by its attention and MLP;
  ``q_l = clip(kappa * w_l, min_keep, 1)`` with ``w_l = s_l / mean(s over the adapted layers)``
  for probe scores ``s`` (``rates=probe``: a low score drops more) or ``w_l = 1`` (``uniform``);
* ``kappa`` is the one value (bisection) for which the sublayer step-cost model (method/cost.py,
  :class:`SublayerCostModel`) predicts ``target_speedup``: the step-time ratio of all-layer LoRA
  without dropping to this recipe with dropping, in expectation over the masks;
* the mask of optimizer step ``t`` (1-based) draws ``u`` uniform on [0, 1) for every (adapted
  layer, sublayer), in layer order, attention first, from ``numpy.random.default_rng([seed, t])``;
  a sublayer is dropped when ``u >= q_l``. Steps ``t <= warmup_steps`` drop nothing. Should every
  sublayer be dropped, the MLP of the layer with the highest ``q`` (the lowest such layer) is kept,
  so that the step has a gradient. The mask depends on (seed, step) only: a resumed run replays it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from aletheia_hpc.method.families import FamilySpec, family_of

SUBLAYERS = ("attention", "mlp")
GUIDANCE = ("probe", "uniform")


class InfeasibleDrop(ValueError):
    """No drop rates (at min_keep or above) reach the target speedup."""


@dataclass(frozen=True)
class DropPlan:
    """Keep probabilities of the adapted layers and the mask of every step; see the module docstring."""
    layers: tuple[int, ...]  # adapted layers, ascending
    keep: tuple[float, ...]  # keep probability per adapted layer (same order)
    seed: int
    warmup_steps: int = 0
    predicted_speedup: float | None = None  # the cost model's, in expectation over the masks

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.keep) or not self.layers:
            raise ValueError("a drop plan needs one keep probability per adapted layer")
        if any(not 0.0 <= q <= 1.0 for q in self.keep):
            raise ValueError(f"keep probabilities must lie in [0, 1], got {self.keep}")

    def dropped(self, step: int) -> frozenset[tuple[int, str]]:
        """The (layer, sublayer) pairs detached in optimizer step ``step`` (1-based)."""
        if step <= self.warmup_steps:
            return frozenset()
        u = np.random.default_rng([self.seed, step]).random((len(self.layers), len(SUBLAYERS)))
        keep = np.asarray(self.keep)[:, None]
        drop = u >= keep
        if drop.all():
            drop[int(np.argmax(keep[:, 0])), SUBLAYERS.index("mlp")] = False
        return frozenset((self.layers[i], SUBLAYERS[j]) for i, j in zip(*np.nonzero(drop)))

    def dropped_fraction(self, steps: int) -> float:
        """The share of adapted sublayers dropped over optimizer steps 1..steps (realised, not expected)."""
        if steps < 1:
            return 0.0
        total = sum(len(self.dropped(t)) for t in range(1, steps + 1))
        return total / (steps * len(self.layers) * len(SUBLAYERS))

    def drop_rates(self, num_layers: int) -> list[float | None]:
        """Drop probability per layer of the model (None: not adapted)."""
        rates: list[float | None] = [None] * num_layers
        for layer, q in zip(self.layers, self.keep):
            rates[layer] = 1.0 - q
        return rates

    def keep_map(self) -> dict[tuple[int, str], float]:
        return {(layer, kind): q for layer, q in zip(self.layers, self.keep) for kind in SUBLAYERS}

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "keep": list(self.keep), "seed": self.seed,
                "warmup_steps": self.warmup_steps, "predicted_speedup": self.predicted_speedup}

    @classmethod
    def from_dict(cls, data: dict) -> "DropPlan":
        return cls(tuple(data["layers"]), tuple(data["keep"]), data["seed"], data["warmup_steps"],
                   data["predicted_speedup"])


def plan_drop(scores: Sequence[float], layers: Sequence[int], cost, target_speedup: float, *, seed: int,
              guidance: str = "probe", min_keep: float = 0.1, warmup_steps: int = 0) -> DropPlan:
    """The drop plan whose expected step ``cost`` (a SublayerCostModel) predicts ``target_speedup``
    over all-layer LoRA without dropping (module docstring). Raises InfeasibleDrop if even
    ``min_keep`` everywhere is predicted slower than the target."""
    if guidance not in GUIDANCE:
        raise ValueError(f"guidance={guidance!r}: use one of {GUIDANCE}")
    if not 0.0 < min_keep <= 1.0:
        raise ValueError(f"min_keep={min_keep}: must be in (0, 1]")
    layers = tuple(sorted(set(layers)))
    if guidance == "probe":
        chosen = np.asarray([float(scores[l]) for l in layers])
        mean = chosen.mean()
        weights = chosen / mean if mean > 0 else np.ones(len(layers))
    else:
        weights = np.ones(len(layers))

    def keep_at(kappa: float) -> tuple[float, ...]:
        return tuple(float(q) for q in np.clip(kappa * weights, min_keep, 1.0))

    def speedup(keep: tuple[float, ...]) -> float:
        return cost.speedup(layers, {(l, kind): q for l, q in zip(layers, keep) for kind in SUBLAYERS})

    positive = weights[weights > 0]
    kappa_high = 1.0 / positive.min() if positive.size else 1.0  # every weighted layer kept
    if speedup(keep_at(kappa_high)) >= target_speedup:
        kappa = kappa_high  # no dropping needed (or none possible above min_keep)
    else:
        if speedup(keep_at(0.0)) < target_speedup:
            raise InfeasibleDrop(f"target_speedup={target_speedup}: even min_keep={min_keep} everywhere is "
                                 f"predicted {speedup(keep_at(0.0)):.3f}x; lower the target or min_keep")
        low, high = 0.0, kappa_high  # speedup(keep_at(low)) >= target > speedup(keep_at(high))
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if speedup(keep_at(mid)) >= target_speedup else (low, mid)
        kappa = low
    keep = keep_at(kappa)
    return DropPlan(layers, keep, seed, warmup_steps, speedup(keep))


def sublayer_path(family: FamilySpec, kind: str) -> str:
    """The module of one layer that is its attention or MLP sublayer (the first path component of
    the family's attention or MLP targets), e.g. ``self_attn`` and ``mlp`` for llama."""
    targets = family.attention if kind == "attention" else (family.mlp or family.mlp_parameters)
    return targets[0].split(".")[0]


def _detached(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0].detach(), *output[1:])
    raise TypeError(f"cannot detach a sublayer output of type {type(output).__name__}")


class BackwardDropper:
    """Forward hooks on the attention and MLP sublayers of ``model``'s layers (all of them: the
    calibration drops frozen ones too) that detach a sublayer's output while it is in the current
    drop set. ``plan`` gives the set of each optimizer step (:meth:`at_step`, :meth:`set_step`);
    :meth:`dropping` sets any set for a block. Remove the hooks with :meth:`remove` (or ``with``)."""

    def __init__(self, model: torch.nn.Module, family: FamilySpec | None = None, plan: DropPlan | None = None):
        family = family or family_of(model)
        self.plan = plan
        self._dropped: frozenset[tuple[int, str]] = frozenset()
        self._handles = []
        paths = {sublayer_path(family, kind): kind for kind in SUBLAYERS}
        for name, module in model.named_modules():
            last = name.rsplit(".", 1)[-1]
            layer = family.layer_of(name + ".") if last in paths else None
            if layer is not None and name.endswith(f"{family.layer_prefix(layer)}.{last}"):
                self._handles.append(module.register_forward_hook(self._hook((layer, paths[last]))))
        if not self._handles:
            raise ValueError(f"no {'/'.join(paths)} sublayers found under {family.layers_path}")

    def _hook(self, key: tuple[int, str]):
        def hook(module, args, output):
            return _detached(output) if key in self._dropped else None
        return hook

    @contextmanager
    def dropping(self, dropped: Iterable[tuple[int, str]]):
        previous, self._dropped = self._dropped, frozenset(dropped)
        try:
            yield self._dropped
        finally:
            self._dropped = previous

    def at_step(self, step: int):
        """Context: the plan's mask of optimizer step ``step`` (1-based)."""
        return self.dropping(self.plan.dropped(step) if self.plan is not None else ())

    def set_step(self, step: int | None) -> None:
        """Use the plan's mask of ``step`` until the next call (None: drop nothing); for a
        training loop that cannot wrap its step in :meth:`at_step` (the Trainer's callbacks)."""
        self._dropped = self.plan.dropped(step) if step is not None and self.plan is not None else frozenset()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "BackwardDropper":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
