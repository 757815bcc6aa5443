"""The step-cost model, the cost-aware selection rule and the backward-truncation guard, on tiny models
with real timed steps (checks on structure, never on absolute times)."""

import itertools
import logging

import pytest
import torch
from peft.tuners.lora import LoraLayer

from aletheia_hpc.method import (BackwardLayerCounter, InfeasibleSpeedup, LoraRanks, StepCostModel, apply_lora,
                                 calibrate_step_cost, enable_selective_checkpointing, get_family, layer_budget,
                                 select_cost_aware, select_layers)
from aletheia_hpc.models.tiny import build_tiny_model
from aletheia_hpc.worker.stop import StopSignal
from aletheia_hpc.worker.training import train_cell
from aletheia_hpc.config import FaultConfig, TrainConfig
from tests.conftest import probe_batches
from tests.test_worker import make_cell

LAYERS = 6


def test_fit_recovers_known_costs_and_predicts_every_placement():
    truth = StepCostModel(8, fixed_s=1.0, backward_layer_s=0.2, adapter_layer_s=0.05)
    times = {layers: truth.step_time(layers) for layers in [(7,), (0,), tuple(range(8)), (3, 5)]}
    fitted = StepCostModel.fit(8, times)
    for name in ("fixed_s", "backward_layer_s", "adapter_layer_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-9)
    assert fitted.step_time([2, 6]) == pytest.approx(1.0 + 6 * 0.2 + 2 * 0.05)
    assert fitted.speedup(range(8)) == pytest.approx(1.0)
    # only the lowest layer and the count matter: the same set in any order, with repeats
    assert fitted.step_time([6, 2, 2]) == fitted.step_time([2, 6])


def test_fit_keeps_costs_non_negative_when_noise_points_the_wrong_way():
    # the top layer alone measured slower than the bottom layer alone: backward cost is noise here
    fitted = StepCostModel.fit(4, {(3,): 1.02, (0,): 1.00, (0, 1, 2, 3): 1.40})
    assert fitted.backward_layer_s == 0 and fitted.adapter_layer_s > 0 and fitted.fixed_s > 0


def test_fit_refuses_placements_that_cannot_separate_the_costs():
    with pytest.raises(ValueError, match="at least 3"):
        StepCostModel.fit(4, {(3,): 1.0, (0,): 2.0})
    with pytest.raises(ValueError, match="do not separate"):  # all three start at layer 0
        StepCostModel.fit(4, {(0,): 1.0, (0, 1): 1.2, (0, 1, 2): 1.4})
    with pytest.raises(ValueError, match="outside"):
        StepCostModel(4, 1.0, 0.1, 0.1).step_time([4])


def _state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training)


def test_calibration_times_real_steps_and_leaves_the_model_and_rng_as_they_were():
    model = build_tiny_model("llama", num_layers=LAYERS)
    for name, param in model.named_parameters():  # an arbitrary trainable mix, to be restored
        param.requires_grad_("mlp" in name)
    model.eval()
    weights, flags, training = _state(model)
    torch.manual_seed(3)
    expected_draw = torch.rand(4)
    torch.manual_seed(3)
    cost = calibrate_step_cost(model, probe_batches(n=2, batch=4, length=64), LoraRanks(8, 16), steps=2,
                               prepare=enable_selective_checkpointing)
    assert torch.equal(torch.rand(4), expected_draw)  # the adapters' init drew from a forked RNG
    after_weights, after_flags, after_training = _state(model)
    assert after_weights.keys() == weights.keys()
    assert all(torch.equal(after_weights[n], w) for n, w in weights.items())
    assert after_flags == flags and after_training == training
    assert not any(isinstance(m, LoraLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    assert not model.is_gradient_checkpointing  # prepare's checkpointing went with the adapters
    assert all(p.grad is None for p in model.parameters())
    assert cost.num_layers == LAYERS and cost.calibration_s > 0
    assert cost.fixed_s + cost.backward_layer_s + cost.adapter_layer_s > 0
    # structure: raising the lowest layer never costs time, adding adapters never saves any
    for size in (1, 3):
        times = [cost.step_time(range(low, low + size)) for low in range(LAYERS - size + 1)]
        assert times == sorted(times, reverse=True)
    assert [cost.step_time(range(k)) for k in range(1, LAYERS + 1)] == sorted(
        cost.step_time(range(k)) for k in range(1, LAYERS + 1))
    assert cost.speedup(range(LAYERS)) == pytest.approx(1.0) and cost.speedup([LAYERS - 1]) >= 1.0
    # the model is usable afterwards exactly as before: real LoRA goes on
    peft_model = apply_lora(model, get_family("llama"), [4, 5])
    assert {get_family("llama").layer_of(n) for n, p in peft_model.named_parameters() if p.requires_grad} == {4, 5}


def _brute_force(scores, cost, target, budget):
    best = None
    for size in range(1, budget + 1):
        for layers in itertools.combinations(range(len(scores)), size):
            if cost.speedup(layers) >= target:
                key = (sum(scores[i] for i in layers), cost.speedup(layers), min(layers))
                best = max(best or (key, layers), (key, layers))
    return sorted(best[1])


@pytest.mark.parametrize("target", [1.0, 1.2, 1.4, 1.7, 2.2])
@pytest.mark.parametrize("costs", [(1.0, 0.2, 0.05), (1.0, 0.02, 0.2), (0.5, 0.1, 0.1)])
def test_cost_aware_is_the_best_scoring_set_that_meets_the_target(target, costs):
    scores = [9.0, 3.0, 4.0, 1.0, 5.0, 2.5, 0.5, 6.0]
    cost = StepCostModel(len(scores), *costs)
    budget = layer_budget(len(scores), 50)
    try:
        expected = _brute_force(scores, cost, target, budget)
    except TypeError:  # nothing meets the target
        with pytest.raises(InfeasibleSpeedup, match="lower the target"):
            select_cost_aware(scores, cost, target, 50)
        return
    chosen = select_cost_aware(scores, cost, target, 50)
    assert chosen == expected and len(chosen) <= budget
    assert cost.speedup(chosen) >= target


def test_cost_aware_is_aletheia_when_aletheia_is_fast_enough_and_moves_up_when_not():
    scores = [9.0, 3.0, 4.0, 1.0, 5.0, 2.5, 0.5, 6.0]
    cost = StepCostModel(len(scores), 1.0, 0.2, 0.05)
    top = select_layers(scores, 50)
    assert select_cost_aware(scores, cost, 1.0, 50) == top == [0, 2, 4, 7]
    faster = select_cost_aware(scores, cost, cost.speedup(top) + 0.01, 50)
    assert faster != top and cost.speedup(faster) > cost.speedup(top)
    assert sum(scores[i] for i in faster) < sum(scores[i] for i in top)
    # where backward dominates, meeting a higher target means leaving the bottom layer out
    backward_bound = StepCostModel(len(scores), 1.0, 0.2, 0.0)
    assert min(select_cost_aware(scores, backward_bound, backward_bound.speedup(top) + 0.01, 50)) > 0
    with pytest.raises(ValueError, match="8 layer scores for a cost model of 6"):
        select_cost_aware(scores, StepCostModel(6, 1.0, 0.1, 0.1))


def _grad_batches(n=2):
    return [dict(b, labels=b["input_ids"]) for b in probe_batches(n=n, pad_last=False)]


def test_counter_sees_backward_stop_at_the_lowest_adapted_layer_and_sees_it_run_below():
    family = get_family("llama")
    batch = _grad_batches(1)[0]
    model = apply_lora(build_tiny_model("llama", num_layers=LAYERS), family, [3, 5])
    with BackwardLayerCounter(model, family) as counter:
        model(**batch).loss.backward()
    assert counter.layers == [3, 4, 5]
    # the input-embedding require-grads hook that checkpointing adds: backward reaches every layer
    model.get_base_model().enable_input_require_grads()
    with BackwardLayerCounter(model, family) as counter:
        model(**batch).loss.backward()
    assert counter.count == LAYERS
    model(**batch).loss.backward()  # outside the context: hooks are gone, nothing more recorded
    assert counter.count == LAYERS


def _train(tmp_path, model, family):
    from aletheia_hpc.data.instructions import PadCollator
    from aletheia_hpc.models.tokenizer import tiny_tokenizer

    examples = [{"input_ids": b["input_ids"][0].tolist(), "labels": b["input_ids"][0].tolist()}
                for b in _grad_batches(8)]
    return train_cell(model, tiny_tokenizer(), examples, PadCollator(0), TrainConfig(steps=2, warmup_steps=0,
                      grad_accum=1, checkpoint_every=0), lr=1e-3, batch_size=2, precision="fp32", seed=0,
                      work_dir=tmp_path, device=torch.device("cpu"), stop=StopSignal(), faults=FaultConfig(),
                      progress=False, family=family)


def test_training_records_backward_layers_and_catches_the_checkpointing_hook(tmp_path):
    family = get_family("llama")
    selective = apply_lora(build_tiny_model("llama", num_layers=LAYERS), family, [4, 5])
    enable_selective_checkpointing(selective)
    assert _train(tmp_path / "selective", selective, family).backward_layers == 2
    naive = apply_lora(build_tiny_model("llama", num_layers=LAYERS), family, [4, 5])
    naive.get_base_model().activation_checkpointing_enable()  # adds the input-require-grads hook
    assert _train(tmp_path / "naive", naive, family).backward_layers == LAYERS


def test_selection_cells_record_predicted_speedup_and_backward_layers(tmp_path, caplog):
    from aletheia_hpc.worker.cell import run_cell

    rows = {recipe: run_cell(make_cell("model=tiny-llama", f"recipe={recipe}", "train.steps=3"), tmp_path,
                             progress=False) for recipe in ("standard", "aletheia", "cost_aware")}
    assert rows["standard"]["predicted_speedup"] == 1.0 and rows["standard"]["backward_layers"] == 6
    for recipe in ("aletheia", "cost_aware"):
        row = rows[recipe]
        cost = StepCostModel(**row["step_cost"])
        assert row["predicted_speedup"] == pytest.approx(cost.speedup(row["selected_layers"]))
        assert row["predicted_step_time_s"] == pytest.approx(cost.step_time(row["selected_layers"]))
        assert row["cost_calibration_time_s"] > 0
        assert row["backward_layers"] == 6 - min(row["selected_layers"])
    ca = rows["cost_aware"]
    assert ca["predicted_speedup"] >= 1.5
    assert ca["selected_layers"] == select_cost_aware(ca["layer_scores"], StepCostModel(**ca["step_cost"]), 1.5)
    assert "backward ran through" not in caplog.text


def test_cells_warn_when_backward_runs_below_the_lowest_adapted_layer(tmp_path, caplog, monkeypatch):
    """A checkpointing preparation that keeps transformers' input-require-grads hook (what the cell
    would do without enable_selective_checkpointing) is caught by the guard."""
    import aletheia_hpc.method as method

    def naive(model):
        model.get_base_model().activation_checkpointing_enable()
    monkeypatch.setattr(method, "enable_selective_checkpointing", naive)
    from aletheia_hpc.worker.cell import run_cell

    with caplog.at_level(logging.WARNING):
        row = run_cell(make_cell("model=tiny-llama", "recipe=last_k", "train.steps=2",
                                 "model.gradient_checkpointing=true"), tmp_path, progress=False)
    assert row["selected_layers"] == [3, 4, 5] and row["backward_layers"] == 6
    assert "backward ran through 6 layers" in caplog.text


@pytest.mark.parametrize("override,message", [
    ("recipe.cost.calibration_steps=0", "recipe.cost.calibration_steps=0 with recipe.layers=cost_aware"),
    ("recipe.cost.target_speedup=0.8", "recipe.cost.target_speedup=0.8: must be >= 1.0"),
    ("recipe.cost.calibration_warmup=-1", "recipe.cost.calibration_warmup=-1: must be >= 0"),
])
def test_cost_aware_config_errors_name_the_field(override, message):
    from aletheia_hpc.config import ConfigError, validate_cell

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_cell(make_cell("model=tiny-llama", "recipe=cost_aware", override))
