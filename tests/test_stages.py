"""Staged studies (campaign.stages): ranking and decisions from rows, their determinism, plan-time
checks of the stages config, the factorial statistics, and one real study on tiny models in which a
failed cell holds stage 1 until the operator advances with the failure."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from aletheia_hpc.aggregate.stats import factorial_effects
from aletheia_hpc.campaign.matrix import expand
from aletheia_hpc.campaign.stages import decide, merge_overrides, rank_arms
from aletheia_hpc.config import ConfigError, FactorConfig, StagesConfig
from aletheia_hpc.provenance import REPO_ROOT

STAGES = StagesConfig(advance=2, baseline="standard", full_steps=50,
                      factors=[FactorConfig("modules", ["recipe.modules=attention", "recipe.modules=mlp"]),
                               FactorConfig("lr", ["train.lr=1e-4", "train.lr=2e-4"])],
                      factorial_seeds=[1, 2, 3])


def _arm(name, recipe, variant, overrides=(), from_arm=None):
    return {"name": name, "recipe": recipe, "variant": variant, "overrides": list(overrides), "steps": None,
            "from_arm": from_arm, "levels": {}}


def _row(cell_id, loss, time_s, status="ok", probe=0.0):
    return {"cell_id": cell_id, "status": status, "eval_loss": loss if status == "ok" else None,
            "train_time_s": time_s, "probe_time_s": probe}


def _stage1():
    arms = [_arm("standard", "standard", "matched"), _arm("aletheia", "aletheia", "matched"),
            _arm("aletheia@l12", "aletheia", "l12", ["recipe.layer_pct=33.4"]),
            _arm("aletheia@lr_high", "aletheia", "lr_high", ["train.lr=4e-4"])]
    cells = [{"cell_id": f"c{i}", "arm": a["name"], "seed": 42, "levels": {}} for i, a in enumerate(arms)]
    cells.append({"cell_id": "cb", "arm": "base", "seed": 0, "levels": {}})
    return {"stage": 1, "arms": arms, "seeds": [42], "cells": cells}


def test_eval_loss_ranks_first_and_equal_losses_go_to_the_faster_arm():
    figures = {"a": {"arm": "a", "n": 1, "eval_loss": 1.2341, "time_s": 10.0},
               "b": {"arm": "b", "n": 1, "eval_loss": 1.2339, "time_s": 5.0},  # ties a at 3 decimals, faster
               "c": {"arm": "c", "n": 1, "eval_loss": 1.1000, "time_s": 50.0},
               "d": {"arm": "d", "n": 0, "eval_loss": None, "time_s": None}}  # no ok row: not ranked
    assert [f["arm"] for f in rank_arms(figures, STAGES)] == ["c", "b", "a"]
    exact = StagesConfig(advance=1, loss_decimals=6)
    assert [f["arm"] for f in rank_arms(figures, exact)] == ["c", "b", "a"]
    speedy = StagesConfig(advance=1, objective="speed_quality", time_weight=0.5)
    ranked = rank_arms(figures, speedy)
    assert [f["arm"] for f in ranked] == ["b", "a", "c"]  # 10x the time costs sqrt(10) in the score
    assert ranked[0]["score"] == pytest.approx(1.2339) and ranked[2]["score"] == pytest.approx(1.1 * 10 ** 0.5)


def test_stage1_advances_the_best_arms_and_the_baseline_at_full_steps_the_same_way_every_time():
    rows = {"c0": _row("c0", 1.00, 100.0), "c1": _row("c1", 1.30, 50.0, probe=5.0),
            "c2": _row("c2", 1.10, 30.0), "c3": _row("c3", 1.20, 55.0), "cb": _row("cb", 2.0, None)}
    decision = decide(_stage1(), rows, STAGES)
    # standard has the lowest loss but is the baseline: it advances as the reference, not as a candidate
    assert decision["advanced"] == ["aletheia@l12", "aletheia@lr_high"] and decision["baseline"] == "standard"
    assert [f["arm"] for f in decision["ranking"]] == ["standard", "aletheia@l12", "aletheia@lr_high", "aletheia"]
    assert decision["ranking"][3]["time_s"] == 55.0  # training + probe
    nxt = decision["next"]
    assert nxt["stage"] == 2 and nxt["seeds"] == [42]
    assert [(a["name"], a["steps"], a["overrides"], a["from_arm"]) for a in nxt["arms"]] == [
        ("aletheia@l12-full", 50, ["recipe.layer_pct=33.4"], "aletheia@l12"),
        ("aletheia@lr_high-full", 50, ["train.lr=4e-4"], "aletheia@lr_high"),
        ("standard@full", 50, [], "standard")]
    assert nxt["arms"][2]["variant"] == "full"
    again = decide(_stage1(), json.loads(json.dumps(rows)), STAGES)
    assert json.dumps(again, sort_keys=True) == json.dumps(decision, sort_keys=True)


def test_a_failed_cell_counts_in_no_figure():
    rows = {"c0": _row("c0", 1.00, 100.0), "c1": _row("c1", None, 50.0, status="failed"),
            "c2": _row("c2", 1.10, 30.0), "c3": _row("c3", 1.20, 55.0)}
    decision = decide(_stage1(), rows, STAGES)
    assert decision["n_failed"] == 1  # the base cell (no row here) is no arm
    assert decision["unranked"] == ["aletheia"] and "aletheia" not in {f["arm"] for f in decision["ranking"]}


def test_stage2_takes_the_best_non_baseline_arm_into_a_factorial_on_its_settings():
    arms = [_arm("aletheia@l12-full", "aletheia", "l12-full", ["recipe.layer_pct=33.4", "train.lr=4e-4"],
                 "aletheia@l12"), _arm("standard@full", "standard", "full", [], "standard")]
    stage = {"stage": 2, "arms": arms, "seeds": [42],
             "cells": [{"cell_id": "f0", "arm": arms[0]["name"], "seed": 42, "levels": {}},
                       {"cell_id": "f1", "arm": "standard@full", "seed": 42, "levels": {}}]}
    decision = decide(stage, {"f0": _row("f0", 1.2, 10.0), "f1": _row("f1", 1.1, 30.0)}, STAGES)
    assert decision["winner"] == "aletheia@l12-full"  # standard ranks first but is the baseline
    nxt = decision["next"]
    assert nxt["seeds"] == [1, 2, 3] and nxt["factors"] == ["modules", "lr"] and len(nxt["arms"]) == 4
    first = nxt["arms"][0]
    assert first["name"] == "aletheia@fx-modules=attention-lr=1e-4"
    assert first["levels"] == {"modules": "attention", "lr": "1e-4"}
    # the level replaces the winner's own value of that field; the rest of its settings stay
    assert first["overrides"] == ["recipe.layer_pct=33.4", "recipe.modules=attention", "train.lr=1e-4"]
    assert merge_overrides(["a=1", "b=2"], ["b=3"]) == ["a=1", "b=3"]


def test_factorial_effects_and_what_a_ci_over_seeds_can_say():
    la, lb = ["attention", "mlp"], ["1e-4", "2e-4"]
    # y = 1 + 0.2 [mlp] - 0.1 [2e-4] + 0.05 [mlp and 2e-4] + seed noise on one corner
    values = {}
    for s, noise in ((1, 0.00), (2, 0.01), (3, -0.01)):
        for a in la:
            for b in lb:
                values[(a, b, s)] = (1 + 0.2 * (a == "mlp") - 0.1 * (b == "2e-4") + 0.05 * (a == "mlp" and b == "2e-4")
                                     + noise * (a == "mlp" and b == "1e-4"))
    fx = factorial_effects(values, ("modules", "lr"), (la, lb))
    e = fx["effects"]
    assert e["modules"]["mean"] == pytest.approx(0.225) and e["lr"]["mean"] == pytest.approx(-0.075)
    assert e["modules x lr"]["mean"] == pytest.approx(0.025)
    lo, hi = e["modules"]["ci95"]
    assert lo < 0.225 < hi and e["modules"]["note"] is None
    # without the noise every seed gives the same effect: the degenerate interval is said, not printed as [x, x]
    exact = {k: (1 + 0.2 * (k[0] == "mlp")) for k in values}
    flat = factorial_effects(exact, ("modules", "lr"), (la, lb))["effects"]["modules"]
    assert flat["ci95"] is None and flat["note"].startswith("zero variance") and flat["mean"] == pytest.approx(0.2)
    one = factorial_effects({k: v for k, v in values.items() if k[2] == 1}, ("modules", "lr"), (la, lb))
    assert one["effects"]["lr"]["note"].startswith("n too small")
    partial = {k: v for k, v in values.items() if k != ("mlp", "2e-4", 3)}
    assert factorial_effects(partial, ("modules", "lr"), (la, lb))["seeds_incomplete"] == [3]
    assert np.isfinite(fx["cell_means"][0]["mean"])


BASE = ["campaign=default", "campaign.name=staged_t", "campaign.seeds=[42]",
        "campaign.variants=[{name: matched, recipes: [standard, aletheia]}]"]
GOOD_STAGES = ("campaign.stages={advance: 1, full_steps: 3, factorial_seeds: [42], factors: ["
               "{name: modules, levels: ['recipe.modules=attention', 'recipe.modules=mlp']}, "
               "{name: lr, levels: ['train.lr=1e-3', 'train.lr=2e-3']}]}")


@pytest.mark.parametrize("override, message", [
    ("campaign.stages.advance=5", "campaign.stages.advance=5: must be between 1 and the 1"),
    ("campaign.stages.objective=fastest", "campaign.stages.objective='fastest': use one of"),
    ("campaign.stages.baseline=lora", "campaign.stages.baseline='lora': not a stage-1 arm"),
    ("campaign.stages.factors=[{name: lr, levels: ['train.lrr=1e-3', 'train.lrr=2e-3']}, "
     "{name: m, levels: ['recipe.modules=mlp', 'recipe.modules=all']}]", "campaign.stages.factors[lr].levels"),
    ("campaign.stages.factors=[{name: lr, levels: ['train.lr=1e-3']}]", "give 2 factors of 2 levels each"),
    ("campaign.stages.factors=[{name: s, levels: ['seed=1', 'seed=2']}, "
     "{name: m, levels: ['recipe.modules=mlp', 'recipe.modules=all']}]", "cannot be a factor level"),
])
def test_a_wrong_stages_field_fails_at_plan_time_naming_it(tmp_path, override, message):
    with pytest.raises(ConfigError, match=None) as err:
        expand([*BASE, f"results_dir={tmp_path}", GOOD_STAGES, override])
    assert message in str(err.value)


def test_plan_shows_stage_1_and_the_rule_for_the_next_stages(tmp_path):
    out = cli("plan", *BASE, f"results_dir={tmp_path}", GOOD_STAGES)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stage 1: 2 cells, arms standard, aletheia; not decided yet" in out.stdout
    assert "rule: stage 2: the 1 best stage-1 arm(s) by eval_loss" in out.stdout
    assert "rule: stage 3: factorial on the best non-baseline stage-2 arm: modules" in out.stdout
    assert "(4 runs;" in out.stdout


@pytest.mark.parametrize("text, why", [('{"stage": 1, "adv', "cannot be read"), ('{"stage": 2}', "is not stage 1's")])
def test_a_corrupt_stage_decision_is_named_with_the_fix_by_plan_and_by_aggregate(tmp_path, text, why):
    from aletheia_hpc.aggregate.staged import load_stage_decisions
    from aletheia_hpc.row import InvalidStageDecision

    plan = expand([*BASE, f"results_dir={tmp_path}", GOOD_STAGES])
    path = tmp_path / plan.name / "stages" / "stage1.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"stage1.json {why}.*move it aside to decide stage 1 again"):
        expand([*BASE, f"results_dir={tmp_path}", GOOD_STAGES])
    with pytest.raises(InvalidStageDecision, match=why):
        load_stage_decisions(tmp_path / plan.name)


def test_a_misspelt_stages_key_is_refused():
    with pytest.raises(ConfigError, match="advnce"):
        expand([*BASE, "campaign.stages.advnce=1"])


# ---------------------------------------------------------------------------------------- end to end

E2E = ["campaign=default", "campaign.name=stages_e2e", "campaign.seeds=[42]", "progress=false",
       "cluster.local_workers=3", "model.num_layers=3", "model.max_seq_len=48", "train.steps=2",
       "train.warmup_steps=0", "train.checkpoint_every=0", "data.builtin_size=40", "data.eval_size=4",
       "recipe.probe.batches=1", "recipe.cost.calibration_steps=0",
       # both arms name their lr, so the factorial's (all, 1e-3) corner is the stage-2 winner's cell
       "campaign.variants=[{name: matched, recipes: [aletheia], overrides: ['train.lr=1e-3']}, "
       "{name: l1, recipes: [aletheia], overrides: ['recipe.layer_pct=34', 'train.lr=1e-3']}]",
       "campaign.stages={advance: 1, baseline: '', full_steps: 3, factorial_seeds: [42], factors: ["
       "{name: modules, levels: ['recipe.modules=all', 'recipe.modules=attention']}, "
       "{name: lr, levels: ['train.lr=1e-3', 'train.lr=3e-3']}]}",
       "+campaign.faults={tiny-llama/aletheia/42/l1:{raise_on_attempt:1}}"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    overrides = [*E2E, f"results_dir={results}"]
    held = cli("launch", *overrides, "--until-done")
    held_status = cli("status", *overrides)
    advanced = cli("launch", *overrides, "--until-done", "--advance-with-failures")
    return results / "stages_e2e", overrides, (held, held_status), advanced


def test_a_failed_cell_holds_its_stage_until_the_operator_advances(study):
    camp, overrides, (held, held_status), advanced = study
    assert held.returncode == 1, held.stderr[-3000:]  # --until-done stops at the failed cell
    assert "stage 1: 2 cells, done=1, failed=1; not decided" in held_status.stdout, held_status.stdout
    assert "study at stage 1" in held_status.stdout
    assert advanced.returncode == 0, advanced.stderr[-3000:]
    assert "study complete" in advanced.stdout
    first = json.loads((camp / "stages" / "stage1.json").read_text())
    assert first["n_failed"] == 1 and first["advanced"] == ["aletheia"] and first["unranked"] == ["aletheia@l1"]


def test_each_stage_follows_from_the_last_and_planning_again_gives_the_same_cells(study):
    camp, overrides, _, _ = study
    decisions = [json.loads((camp / "stages" / f"stage{k}.json").read_text()) for k in (1, 2, 3)]
    assert decisions[0]["next"]["arms"][0]["steps"] == 3
    stage2_cells = decisions[0]["next"]["cells"]
    assert [c["arm"] for c in stage2_cells] == ["aletheia@full"]
    spec3 = decisions[1]["next"]
    assert decisions[1]["winner"] == "aletheia@full" and len(spec3["cells"]) == 4
    # the (all, 1e-3) corner computes what the stage-2 winner computed: it is that cell, not a rerun
    corner = next(c for c in spec3["cells"] if c["levels"] == {"modules": "all", "lr": "1e-3"})
    assert corner["cell_id"] == stage2_cells[0]["cell_id"]
    rows = {p.parent.name: json.loads(p.read_text()) for p in camp.glob("cells/*/row.json")}
    assert len(rows) == 2 + 1 + 3
    ranked = sorted((rows[c["cell_id"]]["eval_loss"], c["arm"]) for c in spec3["cells"])
    assert decisions[2]["winner"] == decisions[2]["ranking"][0]["arm"]
    assert abs(decisions[2]["ranking"][0]["eval_loss"] - ranked[0][0]) < 1e-12
    assert decisions[2]["next"] is None
    plans = [expand(overrides), expand(overrides)]
    ids = [[c.cell_id for c in p.cells] for p in plans]
    assert ids[0] == ids[1] and len(ids[0]) == 6 and plans[0].study_complete
    assert [m["cell_id"] for m in plans[0].stages[2].cells] == [c["cell_id"] for c in spec3["cells"]]
    again = cli("launch", *overrides)
    assert again.returncode == 0 and "study complete" in again.stdout and "to run" not in again.stderr
    with pytest.raises(ConfigError, match="the config changed since that stage was decided"):
        expand([*overrides, "data.eval_size=5"])  # every cell changes: stage 2 is not what stage1.json says


def test_aggregate_reports_the_scan_the_full_runs_and_the_factorial(study):
    camp, overrides, _, _ = study
    out = cli("aggregate", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (camp / "REPORT.md").read_text()
    for heading in ("### Stage 1: scan", "### Stage 2: full runs", "### Stage 3: factorial (modules x lr",
                    "### The paper's AutoResearch (section 3.5)"):
        assert heading in report and heading in out.stdout
    staged = json.loads((camp / "stats.json").read_text())["staged"]
    assert staged["study_complete"] and staged["factorial"]["n_runs"] == 4
    assert [t["arm"] for t in staged["scan"]] == ["aletheia", "aletheia@l1"]  # the failed arm: no rank, listed
    modules = staged["factorial"]["effects"]["eval_loss"]["effects"]["modules"]
    assert modules["ci95"] is None and modules["note"].startswith("n too small")  # one seed in this test
    assert "(no CI: n too small" in report
