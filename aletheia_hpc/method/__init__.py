"""The Aletheia method as a library: no SLURM, no Hydra, just a model and some batches.

    from aletheia_hpc.method import family_of, probe_layer_scores, select_layers, apply_lora, LoraRanks

    family = family_of(model)                                # from config.model_type
    scores = probe_layer_scores(model, probe_batches)        # one score per layer
    layers = select_layers(scores, pct=50)                   # top half, sorted
    # or: the best-scoring set predicted >= 1.5x faster than all-layer LoRA on this machine
    #   cost = calibrate_step_cost(model, probe_batches, LoraRanks(16, 64))
    #   layers = select_cost_aware(scores, cost, target_speedup=1.5, pct=50)
    model = apply_lora(model, family, layers, LoraRanks(attention=16, mlp=64))
    # ...train model as any peft model, e.g. lora_step(model, [batch], lora_optimizer(model, lr=2e-4))
    # backward dropping: plan = plan_drop(scores, layers, calibrate_step_cost(..., sublayers=True), 1.4, seed=0)
    #   with BackwardDropper(model, family, plan) as drop: lora_step(model, [batch], opt, drop=drop, step=t)
"""

import importlib

# name -> submodule; resolved on first use (PEP 562) so that importing one submodule, e.g. the
# family registry for config validation, does not pull in torch and peft.
_EXPORTS = {
    **dict.fromkeys(("BackwardLayerCounter", "enable_selective_checkpointing"), "checkpointing"),
    **dict.fromkeys(("StepCostModel", "SublayerCostModel", "calibrate_step_cost", "calibration_layer_sets"), "cost"),
    **dict.fromkeys(("BackwardDropper", "DropPlan", "InfeasibleDrop", "plan_drop"), "drop_backward"),
    **dict.fromkeys(("FamilySpec", "UnknownFamily", "family_of", "get_family", "known_families",
                     "num_layers", "register_family"), "families"),
    **dict.fromkeys(("AdapterPlacementError", "LoraRanks", "adapted_modules", "apply_lora",
                     "build_lora_config", "expected_adapters", "verify_adapters"), "lora"),
    **dict.fromkeys(("PROBE_MODES", "PROBE_NORMS", "QuantizedProbeError", "probe_layer_scores"), "probe"),
    **dict.fromkeys(("STRATEGIES", "InfeasibleSpeedup", "layer_budget", "select_cost_aware", "select_layers"),
                    "selection"),
    **dict.fromkeys(("lora_optimizer", "lora_step", "trainable_parameters"), "step"),
    "time_interleaved": "timing",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
