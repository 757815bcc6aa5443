"""One LoRA optimizer step and its optimizer: the step every trained or timed LoRA run here takes.

The worker's Trainer takes its optimizer from :func:`lora_optimizer` (the one the Trainer would
build by default: fused AdamW on the trainable parameters); the paired timing cell, the step-cost
calibration and the benchmarks step with :func:`lora_step`, so that what is timed is what trains:
forward and backward of each micro-batch (the loss divided by their number, as gradient
accumulation does), gradient clipping, the optimizer's update, gradients set to None.

``drop`` (method/drop_backward.py) detaches the sublayers its mask drops for the step: their
adapters then get no gradient, and backward does not run through them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_optimizer(model: torch.nn.Module, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW on ``model``'s trainable parameters, fused (the transformers Trainer's default,
    adamw_torch_fused, on CPU and CUDA alike)."""
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay, fused=True)


def lora_step(model: torch.nn.Module, micro_batches: Sequence[Mapping[str, torch.Tensor]],
              optimizer: torch.optim.Optimizer, *, max_grad_norm: float = 1.0,
              autocast_dtype: torch.dtype | None = None, scheduler=None, drop=None, step: int = 1) -> float:
    """One optimizer step over ``micro_batches`` (already on the model's device); returns the mean
    loss. ``autocast_dtype``: mixed precision on CUDA (bf16 or fp16 autocast). ``drop``, a
    BackwardDropper, applies its mask for optimizer step ``step`` (1-based)."""
    device_type = next(model.parameters()).device.type
    losses = []
    with drop.at_step(step) if drop is not None else nullcontext():
        for batch in micro_batches:
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(**batch, use_cache=False).loss / len(micro_batches)
            loss.backward()
            losses.append(loss.detach())
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(sum(losses))  # one device sync, after the step
