"""Fused mixture-of-experts tensors split into one Linear per expert, for QLoRA on the experts.

transformers 5 keeps Mixtral's experts as two fused 3-D parameters per layer, ``gate_up_proj``
(experts x 2 intermediate x hidden) and ``down_proj`` (experts x hidden x intermediate), and
bitsandbytes quantizes nn.Linear modules only (bitsandbytes issue #1849), so a quantized load leaves
the experts, nearly all of Mixtral's weights, in 16 bits. ``split_fused_experts`` replaces each fused
experts module after loading by :class:`PerExpertLinears`: per expert one ``gate_up_proj`` Linear
(hidden -> 2 intermediate) and one ``down_proj`` Linear (intermediate -> hidden), built from the
fused slices and, for a quantized model, quantized at once with the model's own BitsAndBytesConfig
(Linear4bit NF4 or Linear8bitLt), one layer at a time so that each layer's fused tensors are freed
before the next is split. The routing math is the fused module's eager forward, step for step: with
unquantized weights the split module computes bit-identical outputs (tests/test_moe_experts.py).

LoRA then adapts each expert's two Linear modules through peft's bitsandbytes layers, one rank-r
adapter per expert and projection: the same adapter shapes as peft's fused-parameter wrapper on the
fused tensors. ``family_for`` names those modules for the LoRA targets.

Loading still materialises the fused tensors first (in the model's precision, on their device):
the memory plan counts that as its own phase (campaign/memory.py).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from aletheia_hpc.method.families import FamilySpec
from aletheia_hpc.models.experts_layout import FUSED, PER_EXPERT, experts_label

FUSED_PARAMETERS = ("gate_up_proj", "down_proj")
_FORMAT_OF_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class ExpertsLayoutError(TypeError):
    """A fused experts module laid out in a way the split does not reproduce."""


class ExpertLinears(nn.Module):
    """One expert: ``gate_up_proj`` (gate and up stacked, as in the fused tensor) and ``down_proj``."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj


class PerExpertLinears(nn.Module):
    """Drop-in for a fused experts module (same forward signature); expert e is the child ``<e>``."""

    def __init__(self, experts: list[ExpertLinears], act_fn: nn.Module):
        super().__init__()
        self.num_experts = len(experts)
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.act_fn = act_fn

    def expert(self, e: int) -> ExpertLinears:
        return self.get_submodule(str(e))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # The fused module's eager forward, expert for expert: same token order, same products, same
        # accumulation order (experts ascending), so only the weights' storage differs.
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit[:, 0].tolist():
            expert = self.expert(expert_idx)
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = expert.gate_up_proj(hidden_states[token_idx]).chunk(2, dim=-1)
            current = expert.down_proj(self.act_fn(gate) * up)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states


def _is_fused_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).ndim == 3
               for name in FUSED_PARAMETERS)


def _check_layout(name: str, module: nn.Module) -> None:
    """Refuse fused layouts other than Mixtral's (transformers' use_experts_implementation flags)."""
    from transformers.integrations.moe import _default_apply_gate

    expected = {"is_concatenated": True, "is_transposed": False, "has_bias": False, "has_gate": True,
                "has_post_expert_norm": False}
    differs = {flag: getattr(module, flag, None) for flag, value in expected.items()
               if getattr(module, flag, None) != value}
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        differs["_apply_gate"] = "overridden"
    if differs:
        raise ExpertsLayoutError(f"{name} ({type(module).__name__}): fused experts with {differs} cannot be "
                                 "split into per-expert Linear modules (only Mixtral's layout: gate and up "
                                 "concatenated, untransposed, no bias); load it with model.quantization=none")


def _linear(weight: torch.Tensor, quantization: BitsAndBytesConfig | None) -> nn.Linear:
    """A bias-free Linear holding ``weight`` (out x in), quantized on its device as ``quantization`` says."""
    out_features, in_features = weight.shape
    if quantization is None:
        linear = nn.Linear(in_features, out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        return linear
    import bitsandbytes as bnb

    if quantization.load_in_4bit:
        linear = bnb.nn.Linear4bit(in_features, out_features, bias=False,
                                   compute_dtype=quantization.bnb_4bit_compute_dtype,
                                   compress_statistics=quantization.bnb_4bit_use_double_quant,
                                   quant_type=quantization.bnb_4bit_quant_type,
                                   quant_storage=quantization.bnb_4bit_quant_storage, device="meta")
        packed = bnb.nn.Params4bit(weight.detach(), requires_grad=False,
                                   compress_statistics=quantization.bnb_4bit_use_double_quant,
                                   quant_type=quantization.bnb_4bit_quant_type,
                                   quant_storage=quantization.bnb_4bit_quant_storage, module=linear)
    elif quantization.load_in_8bit:
        linear = bnb.nn.Linear8bitLt(in_features, out_features, bias=False,
                                     has_fp16_weights=quantization.llm_int8_has_fp16_weight,
                                     threshold=quantization.llm_int8_threshold, device="meta")
        packed = bnb.nn.Int8Params(weight.detach().cpu(), requires_grad=False,
                                   has_fp16_weights=quantization.llm_int8_has_fp16_weight)
    else:
        raise ValueError(f"unsupported quantization config {quantization.quantization_method()!r}")
    linear.weight = packed.to(weight.device)  # bitsandbytes quantizes when the weight is placed
    return linear


def split_fused_experts(model: nn.Module, quantization: BitsAndBytesConfig | None) -> int:
    """Replace every fused experts module of ``model`` by PerExpertLinears, quantized by
    ``quantization`` (None: plain Linear modules in the fused tensors' dtype); the number replaced."""
    fused = [(name, module) for name, module in model.named_modules() if _is_fused_experts(module)]
    for name, module in fused:
        _check_layout(name, module)
    for name, module in fused:
        with torch.no_grad():
            experts = [ExpertLinears(_linear(module.gate_up_proj[e], quantization),
                                     _linear(module.down_proj[e], quantization))
                       for e in range(module.gate_up_proj.shape[0])]
        model.set_submodule(name, PerExpertLinears(experts, module.act_fn))
        del module.gate_up_proj, module.down_proj  # free this layer's fused tensors before the next
    return len(fused)


def experts_in(model: nn.Module) -> str | None:
    """The experts' form in a loaded model, as experts_label names it (``per-expert nf4``,
    ``fused bf16``), or None for a model without experts."""
    for module in model.modules():
        if isinstance(module, PerExpertLinears):
            weight = module.expert(0).gate_up_proj.weight
            quant_state = getattr(weight, "quant_state", None)
            if quant_state is not None:
                weight_format = quant_state.quant_type
            elif weight.dtype == torch.int8:
                weight_format = "int8"
            else:
                weight_format = _FORMAT_OF_DTYPE[weight.dtype]
            return experts_label(PER_EXPERT, weight_format)
        if _is_fused_experts(module):
            return experts_label(FUSED, _FORMAT_OF_DTYPE[module.gate_up_proj.dtype])
    return None


def family_for(model: nn.Module, family: FamilySpec) -> FamilySpec:
    """``family``, or, when ``model`` holds split experts, the family adapting each expert's modules
    (``mlp.experts.<e>.gate_up_proj`` ...) in place of the fused parameters."""
    counts = {m.num_experts for m in model.modules() if isinstance(m, PerExpertLinears)}
    if not counts:
        return family
    if len(counts) > 1 or not family.mlp_parameters:
        raise ExpertsLayoutError(f"family {family.name}: split experts of {sorted(counts)} experts per layer "
                                 f"and fused parameters {family.mlp_parameters}: cannot name their LoRA targets")
    return family.per_expert(counts.pop())


def experts_weight_bytes(model: nn.Module) -> int:
    """Bytes the experts' weights take in ``model`` (fused tensors, or the split modules' weights and
    quantization statistics)."""
    total = 0
    for module in model.modules():
        if _is_fused_experts(module):
            total += sum(getattr(module, n).nbytes for n in FUSED_PARAMETERS)
        elif isinstance(module, PerExpertLinears):
            for linear in (m for e in range(module.num_experts) for m in (module.expert(e).gate_up_proj,
                                                                              module.expert(e).down_proj)):
                total += linear.weight.nbytes
                state = getattr(linear.weight, "quant_state", None)
                if state is not None:  # absmax (and its own, double-quantized, statistics)
                    total += state.absmax.nbytes + (state.state2.absmax.nbytes + state.offset.nbytes
                                                    if state.nested else 0)
                scb = getattr(linear.weight, "SCB", None)
                if scb is not None:
                    total += scb.nbytes
    return total
