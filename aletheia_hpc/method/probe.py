"""The gradient probe: how strongly the fine-tuning loss pulls on each transformer layer.

Two definitions of a layer's score (``norm``), both summed over the probe batches b, where L_b is
the causal-LM loss of batch b over the tokens its labels keep (padding is always masked out, -100):

``layer`` (default)
    score[l] = sum_b || grad_{theta_l} L_b ||_2, theta_l all of layer l's parameters as one vector.
``tensor_sum`` (the paper authors' ``aletheia-lora`` package)
    score[l] = sum_b sum_{p in layer l} || grad_p L_b ||_2, one norm per parameter tensor, added.
    It weighs small tensors (norms, biases) more than ``layer`` does; the two rank layers alike
    when one tensor dominates each layer's gradient.

Which tokens L_b covers is up to the batches' labels (the worker's ``recipe.probe.loss_tokens``:
the response, as in training, or every token, as aletheia-lora does); without labels, every
non-padding token is a target.

Two ways to compute the same scores:

``single_pass`` (default)
    One forward/backward per batch with every layer's parameters trainable. Each parameter's
    gradient is read the moment autograd has accumulated it (a post-accumulate-grad hook), added to
    its layer's squared norm, and freed at once, so at most a few parameter gradients are alive at a
    time: the memory bound of the paper's chunking at 1/ceil(L/8) of its compute.
``chunked``
    The paper's procedure: gradients enabled on ``chunk_size`` layers at a time, ceil(L/chunk_size)
    passes over the probe batches.

Quantized models (bitsandbytes 4-bit NF4 or 8-bit): their linear weights are packed integers that
autograd never differentiates, so a probe that only read parameter gradients would score each layer
by its norms and biases alone. Instead, for every quantized linear y = x W^T + b the probe computes
the gradient the weight would have, dL/dW = G^T X, from the module's input X and output gradient G
(captured by hooks), takes its squared norm and frees it. The score is thus the same quantity as
on an unquantized model, evaluated at the dequantized weights; both modes support it. A
non-floating-point weight in any other kind of module raises QuantizedProbeError.

Both leave the model as they found it: training mode, requires_grad flags, and no .grad.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch

from aletheia_hpc.method.families import FamilySpec, family_of, num_layers

PROBE_MODES = ("single_pass", "chunked")
PROBE_NORMS = ("layer", "tensor_sum")


class QuantizedProbeError(TypeError):
    """The model holds non-floating-point layer weights in a module the probe cannot differentiate."""


def _quantized_linear_types() -> tuple[type, ...]:
    """Linear modules whose packed weight the probe scores through G^T X (bitsandbytes, if installed)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


class _LayerTargets:
    """What the probe reads per layer: floating-point parameters (through their .grad) and
    quantized linear modules (through G^T X)."""

    def __init__(self, model: torch.nn.Module, family: FamilySpec):
        self.params: dict[int, list[torch.nn.Parameter]] = {}
        self.quantized: dict[int, list[torch.nn.Module]] = {}
        packed_owners = {}
        for name, module in model.named_modules():
            for pname, param in module.named_parameters(prefix=name, recurse=False):
                if not param.dtype.is_floating_point:
                    packed_owners[pname] = module
        supported = _quantized_linear_types() if packed_owners else ()
        for name, param in model.named_parameters():
            layer = family.layer_of(name)
            if layer is None:
                continue
            if param.dtype.is_floating_point:
                self.params.setdefault(layer, []).append(param)
                continue
            owner = packed_owners[name]
            if not (isinstance(owner, supported) and name.endswith(".weight")):
                raise QuantizedProbeError(
                    f"parameter {name} has dtype {param.dtype} in a {type(owner).__name__}: the probe "
                    "can score quantized weights only of bitsandbytes Linear4bit/Linear8bitLt modules; "
                    "probe the unquantized model or load it through bitsandbytes."
                )
            self.quantized.setdefault(layer, []).append(owner)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.params) | set(self.quantized))


class _BatchNorms(list):
    """Per-layer accumulator of one batch's gradient: ``add`` takes one tensor's squared norm,
    ``finish`` gives the layer's score for the batch under ``norm`` (module docstring)."""

    def __init__(self, n: int, norm: str):
        super().__init__([0.0] * n)
        self.per_tensor = norm == "tensor_sum"

    def add(self, layer: int, sq: float) -> None:
        self[layer] += math.sqrt(sq) if self.per_tensor else sq

    def finish(self, layer: int) -> float:
        return self[layer] if self.per_tensor else math.sqrt(self[layer])

    def reset(self) -> None:
        self[:] = [0.0] * len(self)


def _add_weight_grad_sq(batch: _BatchNorms, layer: int, x: torch.Tensor):
    """Tensor hook for a quantized linear's output: adds ||G^T X||^2 (one weight tensor) to the layer."""
    x = x.detach().reshape(-1, x.shape[-1])

    def hook(grad: torch.Tensor) -> None:
        g = grad.detach().reshape(-1, grad.shape[-1])
        weight_grad = g.float().T @ x.float()  # (out, in): one matrix alive at a time
        batch.add(layer, float(weight_grad.double().pow(2).sum()))
    return hook


@contextmanager
def _quantized_weight_readers(model: torch.nn.Module, modules: Mapping[int, list[torch.nn.Module]],
                              batch: _BatchNorms):
    """While active, each backward adds the squared weight-gradient norm of ``modules`` (layer ->
    quantized linears) to their layer in ``batch``."""
    if not any(modules.values()):
        yield
        return

    def on_forward(layer):
        def hook(module, inputs, output):
            if not output.requires_grad:
                raise QuantizedProbeError(f"{type(module).__name__} in layer {layer}: its output takes no "
                                          "part in backward, so its weight cannot be scored")
            output.register_hook(_add_weight_grad_sq(batch, layer, inputs[0]))
        return hook

    # Packed weights never require grad: make the embedding output require it so that backward
    # reaches every layer's quantized linears, however few float parameters a layer has.
    handles = [model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))]
    for layer, layer_modules in modules.items():
        handles += [m.register_forward_hook(on_forward(layer)) for m in layer_modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _probe_state(model: torch.nn.Module):
    """Restore requires_grad flags and train/eval mode, and drop any gradients, on exit."""
    with restored_grad_state(model):
        model.eval()  # no dropout: scores must not depend on the dropout draw
        yield


@contextmanager
def restored_grad_state(model: torch.nn.Module):
    """On exit: every parameter's requires_grad flag and the train/eval mode as on entry, no .grad."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
            param.grad = None
        model.train(was_training)


def causal_lm_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch``'s model inputs on ``device``; without labels, every non-padding token is a target."""
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    if "labels" not in inputs:
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels[inputs["attention_mask"] == 0] = -100
        inputs["labels"] = labels
    return inputs


def _loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    inputs = causal_lm_inputs(batch, model.get_input_embeddings().weight.device)
    loss = model(**inputs, use_cache=False).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"probe loss is {loss.item()}: the model or data produce non-finite loss")
    return loss


def _single_pass(model, targets: _LayerTargets, batches, norm: str) -> list[float]:
    n = len(targets.layers)
    scores, batch = [0.0] * n, _BatchNorms(n, norm)

    def reader(layer: int):
        def hook(param: torch.Tensor) -> None:
            batch.add(layer, float(param.grad.detach().double().pow(2).sum()))
            param.grad = None  # freed as soon as it is read
        return hook

    handles = []
    for layer, params in targets.params.items():
        for param in params:
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(reader(layer)))
    try:
        with _quantized_weight_readers(model, targets.quantized, batch):
            for inputs in batches:
                batch.reset()
                _loss(model, inputs).backward()
                for layer in range(n):
                    scores[layer] += batch.finish(layer)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def _chunked(model, targets: _LayerTargets, batches, chunk_size: int, norm: str) -> list[float]:
    layers = targets.layers
    scores, batch = [0.0] * len(layers), _BatchNorms(len(layers), norm)
    for start in range(0, len(layers), chunk_size):
        chunk = layers[start:start + chunk_size]
        for layer, params in targets.params.items():
            for param in params:
                param.requires_grad_(layer in chunk)
        with _quantized_weight_readers(model, {l: targets.quantized.get(l, []) for l in chunk}, batch):
            for inputs in batches:
                batch.reset()
                _loss(model, inputs).backward()
                for layer in chunk:
                    for param in targets.params.get(layer, []):
                        batch.add(layer, float(param.grad.detach().double().pow(2).sum()))
                        param.grad = None
                    scores[layer] += batch.finish(layer)
    return scores


def probe_layer_scores(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    family: FamilySpec | None = None,
    mode: str = "single_pass",
    chunk_size: int = 8,
    norm: str = "layer",
) -> list[float]:
    """Per-layer gradient scores (index = layer) over ``batches`` (dicts with input_ids, attention_mask,
    and optionally labels; without labels, every non-padding token is a target). ``norm``: ``layer``
    or ``tensor_sum`` (module docstring); ``mode`` changes the cost, not the scores."""
    if mode not in PROBE_MODES:
        raise ValueError(f"probe mode {mode!r} is not one of {PROBE_MODES}")
    if norm not in PROBE_NORMS:
        raise ValueError(f"probe norm {norm!r} is not one of {PROBE_NORMS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    family = family or family_of(model)
    batches: Sequence = list(batches)
    if not batches:
        raise ValueError("the probe needs at least one batch")
    targets = _LayerTargets(model, family)
    expected = num_layers(model, family)
    if targets.layers != list(range(expected)):
        raise ValueError(f"layers found under {family.layers_path} are not 0..{expected - 1}")
    with _probe_state(model):
        for param in model.parameters():
            param.requires_grad_(False)
        if mode == "single_pass":
            return _single_pass(model, targets, batches, norm)
        return _chunked(model, targets, batches, chunk_size, norm)
