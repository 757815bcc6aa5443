"""LoRA on the selected layers only, with separate ranks for attention and MLP (or on one of the two:
``LoraRanks.modules``).

Targets are listed as full module (and, for fused MoE experts, parameter) names, one per selected
layer, rather than through ``layers_to_transform``: peft does not apply that filter to
``target_parameters``, and explicit names make the result checkable. ``apply_lora`` checks after
``get_peft_model`` that exactly the intended modules carry adapters with the intended ranks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from aletheia_hpc.method.families import FamilySpec


MODULE_SETS = ("all", "attention", "mlp")


@dataclass(frozen=True)
class LoraRanks:
    attention: int = 16
    mlp: int = 64
    alpha_factor: float = 2.0  # alpha = factor x rank, the paper's r=16 / alpha=32
    dropout: float = 0.0  # peft's fused-expert wrapper (Mixtral) accepts no dropout
    modules: str = "all"  # which projections carry adapters: all | attention | mlp (MODULE_SETS)

    def __post_init__(self) -> None:
        if self.modules not in MODULE_SETS:
            raise ValueError(f"LoRA modules must be one of {MODULE_SETS}, got {self.modules!r}")
        for field_name in ("attention", "mlp"):
            if int(getattr(self, field_name)) <= 0:
                raise ValueError(f"LoRA {field_name} rank must be a positive integer, got "
                                 f"{getattr(self, field_name)}")
        if self.alpha_factor <= 0:
            raise ValueError(f"LoRA alpha_factor must be > 0, got {self.alpha_factor}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def adapts_attention(self) -> bool:
        return self.modules in ("all", "attention")

    @property
    def adapts_mlp(self) -> bool:
        return self.modules in ("all", "mlp")


class AdapterPlacementError(RuntimeError):
    """peft put adapters somewhere other than the selected layers' attention and MLP."""


def expected_adapters(family: FamilySpec, layers: Sequence[int], ranks: LoraRanks) -> dict[str, int]:
    """Target name -> rank for every adapter that must exist."""
    targets = {}
    if ranks.adapts_attention:
        targets.update({name: ranks.attention for name in family.attention_targets(layers)})
    if ranks.adapts_mlp:
        targets.update({name: ranks.mlp for name in family.mlp_module_targets(layers)})
        targets.update({name: ranks.mlp for name in family.mlp_parameter_targets(layers)})
    return targets


def build_lora_config(family: FamilySpec, layers: Sequence[int], ranks: LoraRanks = LoraRanks()) -> LoraConfig:
    """A peft LoraConfig adapting attention and/or MLP (``ranks.modules``) of ``layers`` only."""
    layers = sorted(set(layers))
    if not layers:
        raise ValueError("no layers selected for LoRA")
    if family.mlp_parameters and ranks.dropout and ranks.adapts_mlp:
        raise ValueError(f"family {family.name} adapts fused expert parameters, which peft supports "
                         "only with LoRA dropout 0; set dropout=0")
    attention = family.attention_targets(layers) if ranks.adapts_attention else []
    mlp_modules = family.mlp_module_targets(layers) if ranks.adapts_mlp else []
    mlp_parameters = family.mlp_parameter_targets(layers) if ranks.adapts_mlp else []
    mlp_names = mlp_modules + mlp_parameters
    # Patterns are anchored at a name boundary so "layers.1." never also matches "layers.11.".
    mlp_patterns = {rf"^(.*\.)?{re.escape(name)}$": ranks.mlp for name in mlp_names}
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=ranks.attention,
        lora_alpha=ranks.alpha_factor * ranks.attention,
        lora_dropout=ranks.dropout,
        target_modules=attention + mlp_modules,
        target_parameters=mlp_parameters or None,
        rank_pattern=dict(mlp_patterns),
        alpha_pattern={k: ranks.alpha_factor * v for k, v in mlp_patterns.items()},
        bias="none",
    )


def adapted_modules(model: torch.nn.Module) -> dict[str, int]:
    """Target name -> rank of every adapter in a peft model, names as in the base model."""
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not module.r:
            continue
        name = re.sub(r"^base_model\.model\.", "", name).replace(".base_layer", "")
        parameter = getattr(module, "parameter_name", None)
        if parameter:  # a fused-parameter wrapper adapts one parameter of its module
            name = f"{name}.{parameter}"
        found[name] = next(iter(module.r.values()))
    return found


def verify_adapters(peft_model: torch.nn.Module, family: FamilySpec, layers: Sequence[int],
                    ranks: LoraRanks = LoraRanks()) -> None:
    """Raise AdapterPlacementError unless the adapters are exactly those of ``layers``."""
    want, got = expected_adapters(family, sorted(set(layers)), ranks), adapted_modules(peft_model)
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong_rank = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise AdapterPlacementError(
            f"adapters differ from the selection (family {family.name}): missing={missing[:6]} "
            f"extra={extra[:6]} wrong_rank={wrong_rank[:6]}"
        )


def apply_lora(model: torch.nn.Module, family: FamilySpec, layers: Sequence[int],
               ranks: LoraRanks = LoraRanks()) -> PeftModel:
    """Wrap ``model`` with adapters on ``layers`` and verify the placement; raise if peft erred."""
    peft_model = get_peft_model(model, build_lora_config(family, layers, ranks))
    verify_adapters(peft_model, family, layers, ranks)
    return peft_model
