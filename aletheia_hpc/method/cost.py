"""What an optimizer step costs as a function of the adapted layers, calibrated on the model at hand.

With LoRA on the layer set S of an L-layer model (lowest adapted layer m = min S), one step is

    T(S) = fixed_s + (L - m) * backward_layer_s + |S| * adapter_layer_s

fixed_s
    what every selection pays: the forward of all L layers, embeddings, the LM head and its
    backward, loss, optimizer and framework overhead;
backward_layer_s
    the activation-gradient backward through one frozen layer: autograd runs it for every layer
    from the top down to the lowest adapted one, and for none below (nothing there needs a
    gradient), so its count is L - m, not |S|;
adapter_layer_s
    the adapters of one layer: their forward, their backward (weight gradients) and the optimizer's
    update (with gradient clipping) of their parameters.

Layers of one model are taken as equally costly (true of the dense families here; a model with
uneven layers gets the mean). The three coefficients come from timed steps of three real LoRA
placements, {L-1}, {0} and all layers, on the model, batches and hardware at hand (CPU or CUDA),
which span the model exactly:

    T({L-1}) = fixed + b + a,   T({0}) = fixed + L b + a,   T(all) = fixed + L b + L a.

Calibration wraps the model with peft three times and unloads it again: the model's weights,
requires_grad flags, train/eval mode and the global random state (which the real adapters'
initialisation draws from) are as they were. Any preparation the real training does to the peft
model (activation checkpointing, for instance) should be passed as ``prepare``, so that what is
timed is what will run: if backward in fact runs to the embeddings for every placement, the fit
finds backward_layer_s ~ 0 and predicts no gain from a higher lowest layer, which is then true.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch

from aletheia_hpc.method.drop_backward import BackwardDropper
from aletheia_hpc.method.families import FamilySpec, family_of, num_layers
from aletheia_hpc.method.lora import LoraRanks, apply_lora
from aletheia_hpc.method.probe import causal_lm_inputs, restored_grad_state
from aletheia_hpc.method.step import lora_optimizer, lora_step
from aletheia_hpc.method.timing import time_interleaved


@dataclass(frozen=True)
class StepCostModel:
    """Predicted optimizer-step time (seconds) of LoRA on a layer set; see the module docstring."""
    num_layers: int
    fixed_s: float
    backward_layer_s: float
    adapter_layer_s: float
    calibration_s: float = 0.0  # wall time the calibration took (all of it, not only timed steps)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        for name in ("fixed_s", "backward_layer_s", "adapter_layer_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fixed_s + self.backward_layer_s + self.adapter_layer_s <= 0:
            raise ValueError("a step cost model needs some positive cost")

    def _check(self, layers: Sequence[int]) -> list[int]:
        layers = sorted(set(layers))
        if not layers:
            raise ValueError("no layers selected")
        if layers[0] < 0 or layers[-1] >= self.num_layers:
            raise ValueError(f"layers {layers} outside 0..{self.num_layers - 1}")
        return layers

    def step_time(self, layers: Sequence[int]) -> float:
        """Predicted seconds per optimizer step with adapters on ``layers``."""
        layers = self._check(layers)
        return (self.fixed_s + (self.num_layers - layers[0]) * self.backward_layer_s
                + len(layers) * self.adapter_layer_s)

    def speedup(self, layers: Sequence[int]) -> float:
        """Predicted step-time ratio of all-layer LoRA to LoRA on ``layers`` (> 1: faster)."""
        return self.step_time(range(self.num_layers)) / self.step_time(layers)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def fit(cls, num_layers: int, times: Mapping[tuple[int, ...], float], calibration_s: float = 0.0
            ) -> "StepCostModel":
        """Least-squares fit of the three coefficients to measured step times of layer sets
        (at least three sets spanning the model; coefficients are kept >= 0, since noise on a
        machine where one term is negligible can push its estimate just below zero)."""
        if len(times) < 3:
            raise ValueError(f"need step times of at least 3 layer sets, got {len(times)}")
        rows = [[1.0, float(num_layers - min(layers)), float(len(set(layers)))] for layers in times]
        full = _nonnegative_fit(rows, list(times.values()),
                                "the calibration layer sets do not separate fixed, backward and adapter costs")
        return cls(num_layers, full[0], full[1], full[2], calibration_s)


# the sublayer model's coefficients, in the order of sublayer_counts' columns
SUBLAYER_COEFFICIENTS = ("fixed_s", "backward_attention_s", "backward_mlp_s", "adapter_layer_s",
                         "adapter_attention_s", "adapter_mlp_s")


def sublayer_counts(num_layers: int, layers: Sequence[int], keep: Mapping[tuple[int, str], float] | None = None
                    ) -> list[float]:
    """Expected counts of each SublayerCostModel term (SUBLAYER_COEFFICIENTS' order) with adapters on
    ``layers`` and sublayer (layer, "attention" | "mlp") kept with probability ``keep`` (default 1;
    0 or 1 for a fixed mask), masks drawn independently. Backward runs through a kept sublayer when
    it is adapted, or when some adapted sublayer below it (attention comes before MLP in a layer)
    is kept; the adapters' forward is paid in every adapted layer, their gradients and update only
    in kept sublayers."""
    adapted, keep = set(layers), keep or {}
    counts = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    none_kept_below = 1.0  # probability that no adapted sublayer below the current one is kept
    for layer in range(num_layers):
        for column, kind in enumerate(("attention", "mlp")):
            q = float(keep.get((layer, kind), 1.0))
            if layer in adapted:
                counts[1 + column] += q
                counts[4 + column] += q
                none_kept_below *= 1.0 - q
            else:
                counts[1 + column] += q * (1.0 - none_kept_below)
        counts[3] += layer in adapted
    return counts


@dataclass(frozen=True)
class SublayerCostModel:
    """The step-cost model at sublayer grain, for backward dropping (method/drop_backward.py):

        T = fixed_s + sum over sublayers backward runs through of backward_<kind>_s
            + adapted layers x adapter_layer_s (the adapters' forward)
            + sum over kept adapted sublayers of adapter_<kind>_s (their gradients and update)

    in expectation over the drop masks (:func:`sublayer_counts`). Without dropping it is the layer
    model: backward_layer_s = backward_attention_s + backward_mlp_s, adapter_layer_s of the layer
    model = adapter_layer_s + adapter_attention_s + adapter_mlp_s here."""
    num_layers: int
    fixed_s: float
    backward_attention_s: float
    backward_mlp_s: float
    adapter_layer_s: float
    adapter_attention_s: float
    adapter_mlp_s: float
    calibration_s: float = 0.0

    def expected_step_time(self, layers: Sequence[int], keep: Mapping[tuple[int, str], float] | None = None
                           ) -> float:
        """Predicted mean seconds per step with adapters on ``layers`` and sublayers kept with
        probability ``keep`` ((layer, kind) -> probability; missing: always kept)."""
        layers = sorted(set(layers))
        if not layers or layers[0] < 0 or layers[-1] >= self.num_layers:
            raise ValueError(f"layers {layers} outside 0..{self.num_layers - 1}")
        counts = sublayer_counts(self.num_layers, layers, keep)
        return sum(n * getattr(self, name) for n, name in zip(counts, SUBLAYER_COEFFICIENTS))

    def step_time(self, layers: Sequence[int]) -> float:
        return self.expected_step_time(layers)

    def speedup(self, layers: Sequence[int], keep: Mapping[tuple[int, str], float] | None = None) -> float:
        """Predicted step-time ratio of all-layer LoRA without dropping to ``layers`` with ``keep``."""
        return self.step_time(range(self.num_layers)) / self.expected_step_time(layers, keep)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def fit(cls, num_layers: int, times: Mapping[tuple[tuple[int, ...], frozenset], float],
            calibration_s: float = 0.0) -> "SublayerCostModel":
        """Non-negative least squares on measured step times of (layers, dropped sublayers) placements."""
        rows = [sublayer_counts(num_layers, layers, dict.fromkeys(dropped, 0.0)) for layers, dropped in times]
        full = _nonnegative_fit(rows, list(times.values()),
                                "the calibration placements do not separate the sublayer costs")
        return cls(num_layers, *full, calibration_s=calibration_s)


def sublayer_calibration_placements(num_layers: int) -> list[tuple[tuple[int, ...], frozenset]]:
    """What the sublayer calibration times, as (adapted layers, dropped sublayers): the three layer
    placements; all layers with every attention dropped, and with every MLP dropped (they separate
    the two kinds' adapter and backward costs); the bottom layer alone with the attention of every
    other layer dropped (it separates backward through a frozen attention from its adapters)."""
    everything = tuple(range(num_layers))
    return ([(layers, frozenset()) for layers in calibration_layer_sets(num_layers)]
            + [(everything, frozenset((l, kind) for l in everything)) for kind in ("attention", "mlp")]
            + [((0,), frozenset((l, "attention") for l in range(1, num_layers)))])


def _nonnegative_fit(rows: list[list[float]], seconds: Sequence[float], unseparated: str) -> list[float]:
    """Least squares of ``seconds`` on the design ``rows``, every coefficient kept >= 0 (noise on a
    machine where one term is negligible can push its estimate just below zero): a negative term is
    dropped and the rest refitted."""
    design = torch.tensor(rows, dtype=torch.float64)
    target = torch.tensor([[float(t)] for t in seconds], dtype=torch.float64)
    width = design.shape[1]
    if int(torch.linalg.matrix_rank(design)) < width:
        raise ValueError(unseparated)
    active = list(range(width))
    while True:
        coef = torch.linalg.lstsq(design[:, active], target).solution.flatten().tolist()
        if min(coef) >= 0 or len(active) == 1:
            break
        active.pop(coef.index(min(coef)))
    full = [0.0] * width
    for index, value in zip(active, coef):
        full[index] = max(value, 0.0)
    return full


def calibration_layer_sets(num_layers: int) -> list[tuple[int, ...]]:
    """The placements calibration times: the top layer alone, the bottom layer alone, all layers."""
    if num_layers < 2:
        raise ValueError("a step cost model needs at least 2 layers to separate its costs")
    return [(num_layers - 1,), (0,), tuple(range(num_layers))]


@contextmanager
def _untouched(model: torch.nn.Module):
    """Restore requires_grad flags, train/eval mode, activation checkpointing (which ``prepare`` may
    turn on) and the global RNG (CPU and CUDA) on exit."""
    was_checkpointing = getattr(model, "is_gradient_checkpointing", False)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), restored_grad_state(model):
        try:
            yield
        finally:
            if getattr(model, "is_gradient_checkpointing", False) and not was_checkpointing:
                model.activation_checkpointing_disable()


def calibrate_step_cost(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    ranks: LoraRanks = LoraRanks(),
    *,
    family: FamilySpec | None = None,
    steps: int = 2,
    warmup: int = 1,
    prepare: Callable[[torch.nn.Module], None] | None = None,
    max_grad_norm: float = 1.0,
    sublayers: bool = False,
) -> StepCostModel | SublayerCostModel:
    """Fit a StepCostModel (``sublayers``: a SublayerCostModel) to timed LoRA steps of ``model``
    (not yet wrapped by peft).

    The calibration placements (calibration_layer_sets, or sublayer_calibration_placements) are
    timed interleaved (method/timing.py): ``warmup`` untimed rounds, then ``steps`` timed ones; in
    each round every placement in turn is wrapped with adapters of ``ranks``, given to
    ``prepare``, stepped once (method/step.py) on the round's batch (``batches`` cycled: all
    placements of a round see the same batch, so sequence lengths match) with its sublayers
    detached as the placement says, and unwrapped, wrapping and unwrapping outside the timed span.
    Each timed step is a fresh optimizer's first, whose state allocation scales with the adapters
    and so counts towards the adapter terms. The median of each placement's timed steps enters the
    fit. The model is left as it was (see the module docstring)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"calibration needs steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch")
    family = family or family_of(model)
    total = num_layers(model, family)
    device = model.get_input_embeddings().weight.device
    inputs = [causal_lm_inputs(b, device) for b in batches]
    if sublayers:
        placements = {f"{layers} dropping {sorted(dropped)}": (layers, dropped)
                      for layers, dropped in sublayer_calibration_placements(total)}
    else:
        placements = {str(layers): (layers, frozenset()) for layers in calibration_layer_sets(total)}
    live: dict = {}  # the wrapped model, its optimizer and the dropper while one placement's step runs

    @contextmanager
    def wrapped(name: str):
        layers, dropped = placements[name]
        peft_model = apply_lora(model, family, layers, ranks)
        try:
            if prepare is not None:
                prepare(peft_model)
            live.update(model=peft_model, optimizer=lora_optimizer(peft_model, lr=1e-5),
                        dropper=BackwardDropper(peft_model, family) if dropped else None)
            with live["dropper"].dropping(dropped) if dropped else nullcontext():
                yield
        finally:
            if live.get("dropper") is not None:
                live["dropper"].remove()
            live.clear()
            peft_model.unload()

    def step(i: int) -> None:
        lora_step(live["model"], [inputs[i % len(inputs)]], live["optimizer"], max_grad_norm=max_grad_norm)

    t_start = time.perf_counter()
    with _untouched(model):
        model.train()
        measured = time_interleaved(dict.fromkeys(placements, step), rounds=steps, warmup=warmup, device=device,
                                    around=wrapped)
    times = {placements[name]: statistics.median(values) for name, values in measured.items()}
    if sublayers:
        return SublayerCostModel.fit(total, times, calibration_s=time.perf_counter() - t_start)
    return StepCostModel.fit(total, {layers: t for (layers, _), t in times.items()},
                             calibration_s=time.perf_counter() - t_start)
