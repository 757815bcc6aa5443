"""The Aletheia method as a library: no SLURM, no Hydra, just a model and some batches.

    from aletheia_hpc.method import family_of, probe_layer_scores, select_layers, apply_lora, LoraRanks

    family = family_of(model)                                # from config.model_type
    scores = probe_layer_scores(model, probe_batches)        # one score per layer
    layers = select_layers(scores, pct=50)                   # top half, sorted
    model = apply_lora(model, family, layers, LoraRanks(attention=16, mlp=64))
    # ...train model as any peft model
"""

from aletheia_hpc.method.checkpointing import enable_selective_checkpointing
from aletheia_hpc.method.families import (FamilySpec, UnknownFamily, family_of, get_family,
                                          known_families, num_layers, register_family)
from aletheia_hpc.method.lora import (AdapterPlacementError, LoraRanks, adapted_modules, apply_lora,
                                      build_lora_config, expected_adapters, verify_adapters)
from aletheia_hpc.method.probe import PROBE_MODES, QuantizedProbeError, probe_layer_scores
from aletheia_hpc.method.selection import STRATEGIES, layer_budget, select_layers

__all__ = [
    "enable_selective_checkpointing",
    "FamilySpec", "UnknownFamily", "family_of", "get_family", "known_families", "num_layers",
    "register_family", "AdapterPlacementError", "LoraRanks", "adapted_modules", "apply_lora",
    "build_lora_config", "expected_adapters", "verify_adapters", "PROBE_MODES", "QuantizedProbeError",
    "probe_layer_scores", "STRATEGIES", "layer_budget", "select_layers",
]
