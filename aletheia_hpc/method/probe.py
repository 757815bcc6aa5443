"""The gradient probe: how strongly the fine-tuning loss pulls on each transformer layer.

score[l] = sum over probe batches b of || grad_{theta_l} L_b ||_2, where theta_l are all of layer
l's parameters and L_b is the causal-LM loss of batch b with padding masked out (labels -100).

Two ways to compute the same scores:

``single_pass`` (default)
    One forward/backward per batch with every layer's parameters trainable. Each parameter's
    gradient is read the moment autograd has accumulated it (a post-accumulate-grad hook), added to
    its layer's squared norm, and freed at once, so at most a few parameter gradients are alive at a
    time: the memory bound of the paper's chunking at 1/ceil(L/8) of its compute.
``chunked``
    The paper's procedure: gradients enabled on ``chunk_size`` layers at a time, ceil(L/chunk_size)
    passes over the probe batches.

Both leave the model as they found it: training mode, requires_grad flags, and no .grad.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch

from aletheia_hpc.method.families import FamilySpec, family_of, num_layers

PROBE_MODES = ("single_pass", "chunked")


class QuantizedProbeError(TypeError):
    """The model holds non-floating-point (quantized) layer weights the plain probe cannot score."""


def _layer_parameters(model: torch.nn.Module, family: FamilySpec) -> dict[int, list[tuple[str, torch.nn.Parameter]]]:
    by_layer: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        layer = family.layer_of(name)
        if layer is None:
            continue
        if not param.dtype.is_floating_point:
            raise QuantizedProbeError(
                f"parameter {name} has dtype {param.dtype}: quantized weights get no gradient, so the "
                "plain probe would silently skip them. Probe the unquantized model, or use the "
                "quantized probe mode once available."
            )
        by_layer.setdefault(layer, []).append((name, param))
    return by_layer


@contextmanager
def _probe_state(model: torch.nn.Module):
    """Restore requires_grad flags and train/eval mode, and drop any gradients, on exit."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()  # no dropout: scores must not depend on the dropout draw
    try:
        yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
            param.grad = None
        model.train(was_training)


def _loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    if "labels" not in inputs:
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels[inputs["attention_mask"] == 0] = -100
        inputs["labels"] = labels
    loss = model(**inputs, use_cache=False).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"probe loss is {loss.item()}: the model or data produce non-finite loss")
    return loss


def _single_pass(model, by_layer, batches) -> list[float]:
    scores = [0.0] * len(by_layer)
    batch_sq = [0.0] * len(by_layer)

    def reader(layer: int):
        def hook(param: torch.Tensor) -> None:
            batch_sq[layer] += float(param.grad.detach().double().pow(2).sum())
            param.grad = None  # freed as soon as it is read
        return hook

    handles = []
    for layer, params in by_layer.items():
        for _, param in params:
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(reader(layer)))
    try:
        for batch in batches:
            batch_sq[:] = [0.0] * len(by_layer)
            _loss(model, batch).backward()
            for layer in by_layer:
                scores[layer] += math.sqrt(batch_sq[layer])
    finally:
        for handle in handles:
            handle.remove()
    return scores


def _chunked(model, by_layer, batches, chunk_size: int) -> list[float]:
    scores = [0.0] * len(by_layer)
    layers = sorted(by_layer)
    for start in range(0, len(layers), chunk_size):
        chunk = layers[start:start + chunk_size]
        for layer in layers:
            for _, param in by_layer[layer]:
                param.requires_grad_(layer in chunk)
        for batch in batches:
            _loss(model, batch).backward()
            for layer in chunk:
                sq = 0.0
                for _, param in by_layer[layer]:
                    sq += float(param.grad.detach().double().pow(2).sum())
                    param.grad = None
                scores[layer] += math.sqrt(sq)
    return scores


def probe_layer_scores(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    family: FamilySpec | None = None,
    mode: str = "single_pass",
    chunk_size: int = 8,
) -> list[float]:
    """Per-layer gradient scores (index = layer) over ``batches`` (dicts with input_ids, attention_mask,
    and optionally labels; without labels, every non-padding token is a target)."""
    if mode not in PROBE_MODES:
        raise ValueError(f"probe mode {mode!r} is not one of {PROBE_MODES}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    family = family or family_of(model)
    batches: Sequence = list(batches)
    if not batches:
        raise ValueError("the probe needs at least one batch")
    by_layer = _layer_parameters(model, family)
    expected = num_layers(model, family)
    if sorted(by_layer) != list(range(expected)):
        raise ValueError(f"layers found under {family.layers_path} are not 0..{expected - 1}")
    with _probe_state(model):
        for param in model.parameters():
            param.requires_grad_(False)
        if mode == "single_pass":
            return _single_pass(model, by_layer, batches)
        return _chunked(model, by_layer, batches, chunk_size)
