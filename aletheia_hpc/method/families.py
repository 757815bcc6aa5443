"""Architecture families: where the transformer layers are and which modules are attention or MLP.

A family is described by the dotted path of its layer list and the module paths, relative to one
layer, of its attention and MLP projections. Mixture-of-experts models whose experts are fused 3-D
parameters (Mixtral in transformers 5) list those under ``mlp_parameters``: peft reaches them only
through ``target_parameters``, one name per layer. A quantized load splits them into one module per
expert (models/moe_experts.py); ``FamilySpec.per_expert`` names those modules instead.

To support a new family, register it::

    register_family(FamilySpec(name="myarch", model_types=("myarch",), layers_path="model.blocks",
                               attention=("attn.wq", "attn.wo"), mlp=("ffn.w1", "ffn.w2")))
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at runtime: campaign validation looks families up without torch
    import torch


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]  # values of config.model_type that belong to this family
    layers_path: str  # dotted path of the layer ModuleList, e.g. "model.layers"
    attention: tuple[str, ...]  # module paths inside one layer
    mlp: tuple[str, ...] = ()
    mlp_parameters: tuple[str, ...] = ()  # fused expert parameters inside one layer (MoE)
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.attention or not (self.mlp or self.mlp_parameters):
            raise ValueError(f"family {self.name!r} needs attention and MLP targets")
        pattern = rf"(?:^|\.){re.escape(self.layers_path)}\.(\d+)\."
        object.__setattr__(self, "_layer_re", re.compile(pattern))

    def layer_of(self, parameter_name: str) -> int | None:
        """The layer index a parameter or module belongs to, or None outside the layer stack."""
        match = self._layer_re.search(parameter_name)
        return int(match.group(1)) if match else None

    def layer_prefix(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}"

    def attention_targets(self, layers) -> list[str]:
        return [f"{self.layer_prefix(i)}.{m}" for i in layers for m in self.attention]

    def mlp_module_targets(self, layers) -> list[str]:
        return [f"{self.layer_prefix(i)}.{m}" for i in layers for m in self.mlp]

    def mlp_parameter_targets(self, layers) -> list[str]:
        return [f"{self.layer_prefix(i)}.{p}" for i in layers for p in self.mlp_parameters]

    def per_expert(self, experts: int) -> FamilySpec:
        """This family once its fused expert parameters are split into one module per expert
        (models/moe_experts.py): ``mlp.experts.gate_up_proj`` becomes the modules
        ``mlp.experts.<e>.gate_up_proj`` for e < ``experts``."""
        split = tuple(f"{owner}.{e}.{parameter}" for e in range(experts)
                      for owner, _, parameter in (p.rpartition(".") for p in self.mlp_parameters))
        return replace(self, mlp=self.mlp + split, mlp_parameters=())


_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add (or replace) a family; its model_types then resolve to it."""
    _REGISTRY[spec.name] = spec
    return spec


for _spec in (
    # llama also covers TinyLlama, SmolLM2 and Yi, which ship as model_type "llama".
    FamilySpec("llama", ("llama",), "model.layers", _LLAMA_ATTENTION, _LLAMA_MLP),
    FamilySpec("qwen2", ("qwen2",), "model.layers", _LLAMA_ATTENTION, _LLAMA_MLP),
    FamilySpec("mistral", ("mistral",), "model.layers", _LLAMA_ATTENTION, _LLAMA_MLP),
    FamilySpec("stablelm", ("stablelm",), "model.layers", _LLAMA_ATTENTION, _LLAMA_MLP),
    FamilySpec("olmo", ("olmo", "olmo2"), "model.layers", _LLAMA_ATTENTION, _LLAMA_MLP),
    FamilySpec("phi3", ("phi3",), "model.layers", ("self_attn.qkv_proj", "self_attn.o_proj"),
               ("mlp.gate_up_proj", "mlp.down_proj")),
    FamilySpec("gptj", ("gptj",), "transformer.h",
               ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
               ("mlp.fc_in", "mlp.fc_out")),
    FamilySpec("gpt_neox", ("gpt_neox",), "gpt_neox.layers",
               ("attention.query_key_value", "attention.dense"),
               ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    FamilySpec("mixtral", ("mixtral",), "model.layers", _LLAMA_ATTENTION,
               mlp_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
):
    register_family(_spec)


class UnknownFamily(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


def known_families() -> list[str]:
    return sorted(_REGISTRY)


def get_family(name: str) -> FamilySpec:
    """The family registered as ``name`` or whose model_types contain ``name``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for spec in _REGISTRY.values():
        if name in spec.model_types:
            return spec
    raise UnknownFamily(
        f"unknown architecture family {name!r}; known: {', '.join(known_families())}. "
        "Register it with aletheia_hpc.method.families.register_family(FamilySpec(...)) "
        "naming its layers_path and attention/MLP module paths."
    )


def family_of(model: "torch.nn.Module") -> FamilySpec:
    """The family of a transformers model, from its config.model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnknownFamily(f"{type(model).__name__} has no config.model_type; pass family= explicitly")
    return get_family(model_type)


def num_layers(model: "torch.nn.Module", family: FamilySpec) -> int:
    """Number of transformer layers, counted from the parameters that sit in the layer stack."""
    layers = {family.layer_of(name) for name, _ in model.named_parameters()} - {None}
    if not layers:
        raise UnknownFamily(
            f"no parameter of {type(model).__name__} lies under {family.layers_path!r}; "
            f"the model does not match family {family.name!r}"
        )
    return max(layers) + 1
