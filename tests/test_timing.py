"""Interleaved timing (method/timing.py) and paired timing in campaigns (campaign.timing=paired): the
order and warm-up of real timed callables, plan-time refusal of arms that cannot share one timing
job, and a paired campaign on a tiny model from launch to the aggregate's speed table."""

import json
import shutil
import time

import pytest

from aletheia_hpc.aggregate import aggregate_campaign
from aletheia_hpc.campaign.matrix import expand
from aletheia_hpc.config import CellConfig, ConfigError
from aletheia_hpc.method import time_interleaved
from aletheia_hpc.worker.cell import run_cell
from aletheia_hpc.worker.stop import StopSignal
from aletheia_hpc.worker.training import StopForRequeue

TINY_PAIRED = ["campaign=default", "campaign.timing=paired", "campaign.timing_steps=3",
               "campaign.timing_warmup=1", "train.steps=2", "train.grad_accum=1", "recipe.probe.batches=2",
               "recipe.cost.calibration_steps=1", "recipe.cost.calibration_warmup=0", "data.builtin_size=240",
               "data.eval_size=32", "progress=false"]


def test_time_interleaved_rotates_the_arms_and_leaves_the_warmup_rounds_untimed():
    log = []

    def arm(name):
        def step(i):
            log.append((name, i))
            time.sleep(0.01 * (i + 1))  # round i lasts at least this long, for every arm
        return step

    times = time_interleaved({n: arm(n) for n in "abc"}, rounds=3, warmup=2)
    order = [name for name, _ in log]
    assert order == list("abc" "bca" "cab" "abc" "bca")  # round i starts with the (i mod 3)-th arm
    assert [i for _, i in log] == [i for i in range(5) for _ in range(3)]
    assert set(times) == set("abc") and all(len(t) == 3 for t in times.values())
    for t in times.values():  # the timed steps are rounds 2, 3, 4: the warm-up rounds 0, 1 are not among them
        assert [x >= 0.01 * (i + 3) for i, x in enumerate(t)] == [True] * 3


def test_time_interleaved_keeps_the_setup_around_each_step_out_of_the_timed_span():
    from contextlib import contextmanager

    events = []

    @contextmanager
    def around(name):
        events.append(("enter", name))
        time.sleep(0.3)
        yield
        events.append(("leave", name))

    times = time_interleaved({"x": lambda i: events.append(("step", "x")), "y": lambda i: events.append(("step", "y"))},
                             rounds=2, warmup=0, around=around)
    assert events[:6] == [("enter", "x"), ("step", "x"), ("leave", "x"), ("enter", "y"), ("step", "y"),
                          ("leave", "y")]
    assert all(t < 0.3 for ts in times.values() for t in ts)
    with pytest.raises(ValueError, match="rounds >= 1"):
        time_interleaved({"x": lambda i: None}, rounds=0)


def test_time_interleaved_calls_before_round_untimed_and_stops_on_what_it_raises():
    steps, rounds_seen = [], []

    def before_round(i):
        rounds_seen.append(i)
        if i == 2:
            raise KeyboardInterrupt("stop")
        time.sleep(0.3)

    with pytest.raises(KeyboardInterrupt):
        time_interleaved({"x": lambda i: steps.append(i), "y": lambda i: steps.append(i)}, rounds=3, warmup=1,
                         before_round=before_round)
    assert rounds_seen == [0, 1, 2] and steps == [0, 0, 1, 1]  # round 2 never ran
    times = time_interleaved({"x": lambda i: None}, rounds=2, warmup=0, before_round=lambda i: time.sleep(0.3))
    assert all(t < 0.3 for t in times["x"])


def test_median_ratio_ci_resamples_the_pairs_together():
    from aletheia_hpc.aggregate.stats import median_ratio_ci

    # paired rounds where the machine slowed down for both arms: the ratio is 2 in every round
    reference, arm = [2.0, 4.0, 8.0, 16.0], [1.0, 2.0, 4.0, 8.0]
    assert median_ratio_ci(reference, arm) == pytest.approx((2.0, 2.0, 2.0))
    point, lo, hi = median_ratio_ci([1.0, 1.2, 0.9, 1.1, 1.0], [0.5, 0.7, 0.5, 0.6, 0.4])
    assert point == pytest.approx(1.0 / 0.5) and lo <= point <= hi and lo < hi
    assert median_ratio_ci([3.0], [1.5]) == (2.0, None, None)
    assert median_ratio_ci([], []) == (None, None, None)
    with pytest.raises(ValueError, match="differ in length"):
        median_ratio_ci([1.0, 2.0], [1.0])


def test_paired_timing_adds_one_cell_per_model_and_keeps_every_other_cell_id():
    sequential = expand(["campaign=smoke"])
    paired = expand(["campaign=smoke", "campaign.timing=paired"])
    timing = [c for c in paired.cells if c.timing is not None]
    assert {c.cell_id for c in paired.cells} - {c.cell_id for c in timing} == {c.cell_id for c in sequential.cells}
    assert sorted(c.model.name for c in timing) == sorted({c.model.name for c in sequential.cells})
    for cell in timing:
        assert cell.arm == "paired_timing" and not cell.trains and cell.seed == 42
        trained = {c.arm: c.recipe for c in sequential.cells if c.model.name == cell.model.name and c.seed == 42}
        assert {a.arm: a.recipe for a in cell.timing.arms} == trained
        assert cell.timing.arms[0].arm == "standard"
        assert CellConfig.from_dict(json.loads(json.dumps(cell.to_dict()))) == cell  # as the worker reads cell.json


@pytest.mark.parametrize("overrides, message", [
    (["campaign.variants=[{name: matched}, {name: short, recipes: [aletheia], overrides: ['model.max_seq_len=64']}]"],
     "model tiny-llama: arm aletheia@short cannot be timed beside standard in one job: model.max_seq_len is 64 "
     "there and 128 for standard"),
    (["campaign.variants=[{name: matched}, {name: accum, recipes: [aletheia], overrides: ['train.grad_accum=4']}]"],
     "arm aletheia@accum cannot be timed beside standard in one job: train.grad_accum is 4 there and 2"),
    (["campaign.recipes=[aletheia, last_k]"], "model tiny-llama has no standard arm"),
    (["campaign.timing=pairs"], "campaign.timing='pairs': use one of ('sequential', 'paired')"),
    (["campaign.timing_steps=0"], "campaign.timing_steps=0"),
])
def test_arms_that_cannot_share_a_timing_job_are_refused_at_plan_time(overrides, message):
    with pytest.raises(ConfigError) as refused:
        expand(["campaign=default", "campaign.timing=paired", *overrides])
    assert message in str(refused.value)


def test_a_staged_study_with_paired_timing_is_refused_at_plan_time():
    with pytest.raises(ConfigError, match="campaign.timing=paired with campaign.stages"):
        expand(["campaign=autoresearch_demo", "campaign.timing=paired"])


def test_a_paired_campaign_times_every_arm_in_one_cell_and_the_aggregate_says_so(tmp_path):
    plan = expand([*TINY_PAIRED, f"results_dir={tmp_path}"])
    for cell in plan.cells:  # as the worker runs each (the local dispatcher's own tests cover launching)
        run_cell(CellConfig.from_dict(json.loads(json.dumps(cell.to_dict()))), tmp_path, progress=False)
    rows = [json.loads(p.read_text()) for p in (tmp_path / "default" / "cells").glob("*/row.json")]
    by_arm = {r["arm"]: r for r in rows}
    assert set(by_arm) == {"standard", "aletheia", "paired_timing"}
    timing = by_arm["paired_timing"]
    assert timing["status"] == "ok" and timing["eval_loss"] is None
    measured = timing["paired_timing"]
    assert set(measured) == {"standard", "aletheia"}
    for m in measured.values():
        assert len(m["step_times_s"]) == 3 and all(t > 0 for t in m["step_times_s"])
        assert m["ratio_vs_standard"] == pytest.approx(measured["standard"]["median_step_s"] / m["median_step_s"])
    # the timing cell built every arm as the arm's own cell of seed 42 did: same probe, same layers
    assert measured["aletheia"]["layers"] == by_arm["aletheia"]["selected_layers"]
    assert len(measured["aletheia"]["layers"]) == 3 and measured["aletheia"]["predicted_speedup"] >= 1.0
    assert measured["standard"]["layers"] == list(range(6)) and measured["standard"]["ratio_vs_standard"] == 1.0

    result = aggregate_campaign(tmp_path, "default", figures=False)
    s = result.stats["speed"]["aletheia"]["tiny-llama"]
    assert set(result.stats["speed"]) == {"aletheia"}
    assert s["method"] == "paired" and s["n"] == 3
    assert s["speedup"] == pytest.approx(measured["aletheia"]["ratio_vs_standard"])
    assert s["speedup_ci95"][0] <= s["speedup"] <= s["speedup_ci95"][1]
    # the prediction beside the measurement is the timing cell's own, for the set it timed
    assert s["predicted_speedup"] == pytest.approx(measured["aletheia"]["predicted_speedup"])
    assert s["cells_predicted_speedup"] == pytest.approx(by_arm["aletheia"]["predicted_speedup"])
    assert s["predicted_minus_measured"] == pytest.approx(s["predicted_speedup"] - s["speedup"])
    on_disk = json.loads((tmp_path / "default" / "stats.json").read_text())["speed"]
    assert on_disk["aletheia"]["tiny-llama"]["method"] == "paired"
    report = (tmp_path / "default" / "REPORT.md").read_text()
    assert "## Measured vs predicted speed" in report and "paired (one job, arms interleaved)" in report
    assert result.stats["n_pairs_total"] == 1  # the timing row pairs with nothing

    # without the timing cell's row the same table falls back to the cells' own step times, and says so
    shutil.rmtree(tmp_path / "default" / "cells" / timing["cell_id"])
    s = aggregate_campaign(tmp_path, "default", figures=False, report=False).stats["speed"]["aletheia"]["tiny-llama"]
    assert s["method"] == "sequential" and s["n"] == 1 and s["speedup_ci95"] is None
    assert s["speedup"] == pytest.approx(by_arm["standard"]["step_time_median_s"]
                                         / by_arm["aletheia"]["step_time_median_s"])


class _StopAfterQueries(StopSignal):
    """A stop request that arrives after the cell has asked ``n`` times (as SIGUSR2 would, mid-run)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    @property
    def requested(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_a_stopped_timing_cell_writes_no_row_and_its_next_attempt_times_every_round(tmp_path):
    plan = expand([*TINY_PAIRED, f"results_dir={tmp_path}"])
    [cell] = [c for c in plan.cells if c.timing is not None]
    cell = CellConfig.from_dict(json.loads(json.dumps(cell.to_dict())))
    # two arms built (2 queries), warm-up round (1), then the request: before timed round 1
    with pytest.raises(StopForRequeue, match="before round 2 of the paired timing"):
        run_cell(cell, tmp_path, stop=_StopAfterQueries(3), progress=False)
    work = tmp_path / "default" / "cells" / cell.cell_id
    assert work.is_dir() and not (work / "row.json").exists()
    row = run_cell(cell, tmp_path, progress=False)
    assert row["status"] == "ok" and row["attempts"] == 2
    assert all(len(m["step_times_s"]) == 3 for m in row["paired_timing"].values())
