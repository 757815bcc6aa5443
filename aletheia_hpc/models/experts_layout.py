"""Which form a mixture-of-experts model's experts take once loaded; torch-free, so that the memory
plan and the loader read the same rule.

transformers 5 holds Mixtral's experts as fused 3-D tensors (one per projection, every expert
stacked), which its grouped kernels run fast. bitsandbytes quantizes nn.Linear modules only, so a
quantized cell (QLoRA) splits them into one Linear per expert and projection, which bitsandbytes
then holds in 4 (nf4) or 8 (int8) bits (models/moe_experts.py). Unquantized cells keep the fused form.
"""

from __future__ import annotations

FUSED = "fused"
PER_EXPERT = "per-expert"


def experts_layout(quantization: str) -> str:
    """PER_EXPERT for a quantized model (``model.quantization`` nf4 or int8), else FUSED."""
    return FUSED if quantization == "none" else PER_EXPERT


def experts_label(layout: str, weight_format: str) -> str:
    """How rows, plan and report name the experts' form: ``per-expert nf4``, ``fused bf16``, ..."""
    return f"{layout} {weight_format}"


def planned_experts_label(quantization: str, precision: str) -> str:
    """The label of the experts a model of this quantization and precision will hold once loaded."""
    layout = experts_layout(quantization)
    return experts_label(layout, quantization if layout == PER_EXPERT else precision)
