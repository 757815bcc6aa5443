"""Activation checkpointing that keeps selective LoRA selective.

transformers (and peft) make the embedding output require grad whenever checkpointing is on, which
the old re-entrant checkpoint needed. With it, backward runs through every layer down to the
embeddings even when only the top layers carry adapters, which throws away the saving of
selective LoRA. Non-re-entrant checkpointing needs no such hook, so we use it and remove the hook.

Quantized (QLoRA) models: peft's ``prepare_model_for_kbit_training`` turns on checkpointing with
input gradients too, and registers the input-gradient hook twice, losing the handle of the first;
``enable_selective_checkpointing`` removes both. The worker does not call that preparation at all:
besides the hook, it casts every 16-bit weight bitsandbytes left unquantized to fp32 (embeddings,
LM head and, for Mixtral, all fused experts: 4 instead of 2 bytes x 45B parameters).

``BackwardLayerCounter`` checks the outcome instead of trusting it: while active it counts the
layers whose output actually receives an activation gradient. With LoRA whose lowest adapted layer
is m, that count should be L - m; more means backward runs below m (an input-require-grads hook,
a trainable embedding, ...) and the selection's saving is partly lost.
"""

from __future__ import annotations

import torch

from aletheia_hpc.method.families import FamilySpec, family_of

# transformers' enable_input_require_grads hook, and peft's fallback for models without that method
_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def enable_selective_checkpointing(model: torch.nn.Module) -> None:
    """Turn on non-re-entrant activation checkpointing on a transformers model (or the model inside
    a peft wrapper) without forcing gradients into layers that hold no trainable parameters."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()
    hooks = base.get_input_embeddings()._forward_hooks  # the hooks whose handles were lost
    for key, hook in list(hooks.items()):
        if getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS:
            del hooks[key]


class BackwardLayerCounter:
    """Context manager: the transformer layers whose output receives a gradient in the backward
    passes run inside it (``layers``: sorted indices; ``count``).

    A forward hook on every layer registers a gradient hook on the layer's output tensor when that
    output takes part in autograd; the gradient hook records the layer once a gradient reaches it.
    transformers checkpoints a layer's ``forward``, not its ``__call__``, so the hooks see the real
    outputs under activation checkpointing too."""

    def __init__(self, model: torch.nn.Module, family: FamilySpec | None = None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        family = family or family_of(base)
        self._stack = base.get_submodule(family.layers_path)
        self._reached: set[int] = set()
        self._handles: list = []

    def _on_forward(self, index: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda grad: self._reached.add(index))
        return hook

    def __enter__(self) -> "BackwardLayerCounter":
        self._reached.clear()
        self._handles = [layer.register_forward_hook(self._on_forward(i)) for i, layer in enumerate(self._stack)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def layers(self) -> list[int]:
        return sorted(self._reached)

    @property
    def count(self) -> int:
        return len(self._reached)
