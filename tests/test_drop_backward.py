"""Backward dropping (method/drop_backward.py) on every architecture family: a dropped sublayer's
adapters get no gradient and no update that step while every other adapter does; the rates meet the
sublayer cost model's target; the masks replay after a resume; the recipe's cell records its plan."""

import json

import numpy as np
import pytest
import torch

from aletheia_hpc.campaign.store import DROP_PLAN_FILE, PROGRESS_FILE, cell_path
from aletheia_hpc.config import FaultConfig, TrainConfig
from aletheia_hpc.method import (BackwardDropper, DropPlan, InfeasibleDrop, LoraRanks, SublayerCostModel,
                                 apply_lora, family_of, lora_optimizer, lora_step, plan_drop)
from aletheia_hpc.method.drop_backward import SUBLAYERS, sublayer_path
from aletheia_hpc.models.tiny import TINY_FAMILIES, build_tiny_model
from aletheia_hpc.worker.stop import StopSignal
from tests.conftest import probe_batches

LAYERS = 4


def _batch():
    b = probe_batches(n=1, pad_last=False)[0]
    return dict(b, labels=b["input_ids"])


def _sublayer_of(family, name: str) -> tuple[int, str] | None:
    """(layer, sublayer) of a trainable adapter parameter, from its name."""
    layer = family.layer_of(name)
    for kind in SUBLAYERS:
        if f"{family.layer_prefix(layer)}.{sublayer_path(family, kind)}." in name:
            return layer, kind
    raise AssertionError(f"{name} is in no sublayer")


def _adapters(model, family) -> dict[str, tuple[int, str]]:
    return {name: _sublayer_of(family, name) for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family_name", TINY_FAMILIES)
def test_a_dropped_sublayers_adapters_get_no_gradient_and_every_other_adapter_does(family_name):
    model = build_tiny_model(family_name, num_layers=LAYERS)
    family = family_of(model)
    model = apply_lora(model, family, range(LAYERS), LoraRanks(4, 4))
    with torch.no_grad():  # lora_B starts at zero, which would zero lora_A's gradient
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    adapters = _adapters(model, family)
    assert {key for key in adapters.values()} == {(l, k) for l in range(LAYERS) for k in SUBLAYERS}
    dropped = {(0, "mlp"), (1, "attention"), (2, "attention"), (2, "mlp")}
    params = dict(model.named_parameters())
    with BackwardDropper(model, family) as dropper:
        with dropper.dropping(dropped):
            model(**_batch()).loss.backward()
        for name, key in adapters.items():
            grad = params[name].grad
            if key in dropped:
                assert grad is None, f"{name} of dropped {key} got a gradient"
            else:
                assert grad is not None and grad.abs().sum() > 0, f"{name} of kept {key} got no gradient"
        model.zero_grad(set_to_none=True)
        # outside the block nothing is dropped: every adapter has a gradient again
        model(**_batch()).loss.backward()
        assert all(params[name].grad is not None for name in adapters)


def test_lora_step_with_a_plan_leaves_the_dropped_adapters_untouched_that_step():
    model = build_tiny_model("llama", num_layers=LAYERS)
    family = family_of(model)
    model = apply_lora(model, family, range(LAYERS), LoraRanks(4, 4))
    plan = DropPlan(tuple(range(LAYERS)), (0.5,) * LAYERS, seed=3)
    step = next(t for t in range(1, 50) if 0 < len(plan.dropped(t)) < 2 * LAYERS)
    optimizer = lora_optimizer(model, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with BackwardDropper(model, family, plan) as dropper:
        lora_step(model, [_batch()], optimizer, drop=dropper, step=step)
    for name, key in _adapters(model, family).items():
        moved = not torch.equal(before[name], dict(model.named_parameters())[name])
        if key in plan.dropped(step):
            assert not moved, f"{name} of dropped {key} moved"
        elif "lora_B" in name:  # lora_A's first gradient is zero (lora_B starts at zero)
            assert moved, f"{name} of kept {key} did not move"


def test_masks_depend_on_seed_and_step_only_and_follow_the_keep_probabilities():
    keep = (1.0, 0.8, 0.5, 0.2)
    plan = DropPlan((0, 1, 2, 3), keep, seed=7, warmup_steps=2)
    again = DropPlan((0, 1, 2, 3), keep, seed=7, warmup_steps=2)
    assert [plan.dropped(t) for t in range(1, 40)] == [again.dropped(t) for t in range(39, 0, -1)][::-1]
    assert plan.dropped(1) == plan.dropped(2) == frozenset()  # warmup
    other_seed = DropPlan((0, 1, 2, 3), keep, seed=8, warmup_steps=2)
    assert [plan.dropped(t) for t in range(3, 40)] != [other_seed.dropped(t) for t in range(3, 40)]
    steps = range(3, 3003)
    for layer, q in zip(plan.layers, keep):
        for kind in SUBLAYERS:
            rate = np.mean([(layer, kind) in plan.dropped(t) for t in steps])
            assert rate == pytest.approx(1 - q, abs=0.04)
    # the mask is the documented draw
    u = np.random.default_rng([7, 5]).random((4, 2))
    assert plan.dropped(5) == {(plan.layers[i], SUBLAYERS[j]) for i, j in zip(*np.nonzero(u >= np.array(keep)[:, None]))}
    assert DropPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_a_step_never_drops_every_sublayer():
    plan = DropPlan((1, 2), (0.1, 0.3), seed=0)
    assert all(plan.dropped(t) != {(l, k) for l in (1, 2) for k in SUBLAYERS} for t in range(1, 300))
    assert any((2, "mlp") not in plan.dropped(t) and len(plan.dropped(t)) == 3 for t in range(1, 300))


COST = SublayerCostModel(8, fixed_s=1.0, backward_attention_s=0.06, backward_mlp_s=0.1, adapter_layer_s=0.01,
                         adapter_attention_s=0.02, adapter_mlp_s=0.04)


@pytest.mark.parametrize("guidance", ["probe", "uniform"])
def test_plan_rates_meet_the_cost_models_target_and_follow_the_scores(guidance):
    scores = [0.1, 0.9, 0.4, 0.5, 0.3, 1.0, 0.2, 0.6]
    plan = plan_drop(scores, range(8), COST, 1.3, seed=0, guidance=guidance, min_keep=0.1)
    assert plan.predicted_speedup == pytest.approx(1.3, rel=1e-6)
    assert COST.speedup(range(8), plan.keep_map()) == pytest.approx(1.3, rel=1e-6)
    assert all(0.1 <= q <= 1 for q in plan.keep)
    if guidance == "uniform":
        assert len(set(plan.keep)) == 1
    else:  # a lower score keeps less, and unclipped keeps are proportional to the score
        order = np.argsort(scores)
        assert list(np.asarray(plan.keep)[order]) == sorted(plan.keep)
        free = [i for i, q in enumerate(plan.keep) if 0.1 < q < 1]
        ratios = {round(plan.keep[i] / scores[i], 9) for i in free}
        assert len(ratios) == 1
    with pytest.raises(InfeasibleDrop, match="lower the target or min_keep"):
        plan_drop(scores, range(8), COST, 5.0, seed=0, guidance=guidance)


def test_sublayer_cost_model_without_dropping_is_the_layer_model_and_fit_recovers_it():
    from aletheia_hpc.method.cost import sublayer_calibration_placements

    layer_model_step = (COST.fixed_s + (8 - 3) * (0.06 + 0.1) + 2 * (0.01 + 0.02 + 0.04))
    assert COST.step_time([3, 6]) == pytest.approx(layer_model_step)
    # dropping attention and MLP of the lowest adapted layer: backward stops above it
    assert COST.expected_step_time([3, 6], {(3, "attention"): 0.0, (3, "mlp"): 0.0}) == pytest.approx(
        COST.step_time([6]) + 0.01)
    times = {p: COST.expected_step_time(p[0], dict.fromkeys(p[1], 0.0)) for p in sublayer_calibration_placements(8)}
    fitted = SublayerCostModel.fit(8, times)
    for name in ("fixed_s", "backward_attention_s", "backward_mlp_s", "adapter_layer_s", "adapter_attention_s",
                 "adapter_mlp_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(COST, name), rel=1e-9)


def _train(work_dir, plan, stop):
    from aletheia_hpc.data.instructions import PadCollator
    from aletheia_hpc.models.tokenizer import tiny_tokenizer
    from aletheia_hpc.worker.training import train_cell

    torch.manual_seed(0)
    model = build_tiny_model("llama", num_layers=LAYERS)
    family = family_of(model)
    model = apply_lora(model, family, range(LAYERS), LoraRanks(4, 4))
    examples = [{"input_ids": b["input_ids"][0].tolist(), "labels": b["input_ids"][0].tolist()}
                for b in probe_batches(n=12, pad_last=False)]
    seen = []
    dropper = BackwardDropper(model, family, plan)
    set_step = dropper.set_step

    def recording(step):  # what each optimizer step of this run dropped
        set_step(step)
        if step is not None:
            seen.append((step, dropper._dropped))
    dropper.set_step = recording
    try:
        outcome = train_cell(model, tiny_tokenizer(), examples, PadCollator(0),
                             TrainConfig(steps=5, warmup_steps=0, grad_accum=1, checkpoint_every=0),
                             lr=1e-2, batch_size=2, precision="fp32", seed=0, work_dir=work_dir,
                             device=torch.device("cpu"), stop=stop, faults=FaultConfig(), progress=False,
                             family=family, optimizer=lora_optimizer(model, lr=1e-2), drop=dropper)
    finally:
        dropper.remove()
    return outcome, seen, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_resumed_run_replays_the_drop_sequence_and_ends_where_an_unbroken_one_does(tmp_path):
    from aletheia_hpc.worker.training import StopForRequeue

    plan = DropPlan(tuple(range(LAYERS)), (0.9, 0.3, 0.6, 0.5), seed=11)
    _, unbroken_seen, unbroken = _train(tmp_path / "unbroken", plan, StopSignal())
    assert [s for s, _ in unbroken_seen] == [1, 2, 3, 4, 5]
    assert unbroken_seen == [(t, plan.dropped(t)) for t in range(1, 6)]
    stop = StopSignal()
    stop.request()  # stops for requeue after its first step, checkpointed
    with pytest.raises(StopForRequeue):
        _train(tmp_path / "broken", plan, stop)
    outcome, resumed_seen, resumed = _train(tmp_path / "broken", plan, StopSignal())
    assert outcome.steps == 5
    assert resumed_seen == unbroken_seen[1:]  # steps 2..5, the masks the unbroken run drew
    for name in unbroken:
        torch.testing.assert_close(resumed[name], unbroken[name])


def test_the_drop_backward_cell_records_its_plan_and_a_resumed_attempt_keeps_it(tmp_path):
    from aletheia_hpc.worker.cell import run_cell
    from aletheia_hpc.worker.training import StopForRequeue
    from tests.test_worker import make_cell

    target = 1.05  # within reach of the tiny model's calibrated ceiling on a loaded machine (1.165x seen)
    cell = make_cell("model=tiny-llama", "recipe=drop_backward", f"recipe.drop.target_speedup={target}",
                     "recipe.probe.batches=2", "train.steps=4", "train.eval_every=2")
    stop = StopSignal()
    stop.request()
    with pytest.raises(StopForRequeue):
        run_cell(cell, tmp_path, stop=stop, progress=False)
    work = cell_path(tmp_path, cell)
    first_plan = DropPlan.from_dict(json.loads((work / DROP_PLAN_FILE).read_text()))
    assert json.loads((work / PROGRESS_FILE).read_text())["curve"][0]["step"] == 0
    row = run_cell(cell, tmp_path, progress=False)
    assert row["status"] == "ok" and row["attempts"] == 2 and row["train_steps"] == 4
    assert row["selected_layers"] == list(range(6))
    assert row["drop_rates"] == pytest.approx([1 - q for q in first_plan.keep])
    assert row["predicted_speedup"] == pytest.approx(first_plan.predicted_speedup)
    assert first_plan.predicted_speedup == pytest.approx(target, rel=1e-3)
    assert row["dropped_fraction"] == pytest.approx(first_plan.dropped_fraction(4))
    assert [p["step"] for p in row["curve"]] == [0, 2, 4]
    times = [p["train_time_s"] for p in row["curve"]]
    assert times[0] == 0 and times == sorted(times)
    assert times[2] == pytest.approx(sum(row["step_times_s"]))
    assert row["curve"][-1]["eval_loss"] == pytest.approx(row["eval_loss"])
