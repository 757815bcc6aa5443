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
"""

from __future__ import annotations

import torch

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
