"""Activation checkpointing that keeps selective LoRA selective.

transformers (and peft) make the embedding output require grad whenever checkpointing is on, which
the old re-entrant checkpoint needed. With it, backward runs through every layer down to the
embeddings even when only the top layers carry adapters, which throws away the saving of
selective LoRA. Non-re-entrant checkpointing needs no such hook, so we use it and remove the hook.
"""

from __future__ import annotations

import torch


def enable_selective_checkpointing(model: torch.nn.Module) -> None:
    """Turn on non-re-entrant activation checkpointing on a transformers model (or the model inside
    a peft wrapper) without forcing gradients into layers that hold no trainable parameters."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()
