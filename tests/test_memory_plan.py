"""The memory plan: peak GPU memory per cell against measured H100 peaks, and plan's fit warnings."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from aletheia_hpc import cli
from aletheia_hpc.campaign.matrix import compose_root, option_names
from aletheia_hpc.campaign.memory import GIB, adapter_params, estimate_cell, nominal_params
from aletheia_hpc.config import CellConfig

H100 = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu_speed_h100.txt"
# bench/gpu_speed.py's arms as recipes: top-half-by-depth adapts the last half, like last_k
RECIPE_OF_ARM = {"standard": "standard", "aletheia": "aletheia", "top-half-by-depth": "last_k"}


def cell(*overrides) -> CellConfig:
    r = compose_root(list(overrides))
    return CellConfig(campaign="t", model=r.model, recipe=r.recipe, train=r.train, data=r.data, eval=r.eval,
                      seed=1, variant="matched")


def measured_h100() -> dict[tuple[str, str, str], tuple[int, float]]:
    """(model, precision, arm) -> (trainable parameters, peak GiB) from the first run's table."""
    rows = {}
    pattern = re.compile(r"^(qwen2\.5-\S+)\s+(bf16|nf4)\s+(\S+)\s+\d+\s+([\d,]+)\s+\S+\s+\S+\s+([\d.]+)\s+\d+$")
    for line in H100.read_text().splitlines():
        match = pattern.match(line)
        if match:
            key = match.group(1, 2, 3)
            rows.setdefault(key, (int(match.group(4).replace(",", "")), float(match.group(5))))
    return rows


def test_estimates_are_within_a_quarter_of_the_measured_h100_peaks():
    measured = measured_h100()
    assert len(measured) == 12
    for (model, precision, arm), (trainable, peak) in sorted(measured.items()):
        c = cell(f"model={model}", f"recipe={RECIPE_OF_ARM[arm]}", "model.batch_size=4", "model.max_seq_len=512",
                 "model.precision=bf16", f"model.quantization={'nf4' if precision == 'nf4' else 'none'}",
                 "model.gradient_checkpointing=false")
        layers = c.model.num_layers if arm == "standard" else c.model.num_layers // 2
        assert adapter_params(c.model.shape, layers, 16, 64) == trainable, (model, arm)
        # the bench resets the peak after the probe: compare its arms with the training phase
        estimate = estimate_cell(c).train_gib
        print(f"{model} {precision} {arm}: estimated {estimate:.2f} GiB, measured {peak:.2f} GiB")
        assert 0.8 < estimate / peak < 1.25, (model, precision, arm, estimate, peak)


@pytest.mark.parametrize("model", [m for m in option_names("model") if not m.startswith("tiny-")])
def test_shipped_shapes_agree_with_the_nominal_parameter_count(model):
    c = cell(f"model={model}", "model.precision=fp32", "model.quantization=none")
    estimate = estimate_cell(c)
    assert not estimate.rough, f"{model}: model.shape is missing"
    params = estimate.weights_gib * GIB / 4
    assert abs(params / nominal_params(c.model.params) - 1) < 0.1, (model, params)


def test_quantization_precision_checkpointing_and_gpus_move_the_estimate_the_right_way():
    bf16 = estimate_cell(cell("model=qwen2.5-7b", "recipe=standard"))
    nf4 = estimate_cell(cell("model=qwen2.5-7b", "recipe=standard", "model.quantization=nf4"))
    int8 = estimate_cell(cell("model=qwen2.5-7b", "recipe=standard", "model.quantization=int8"))
    fp32 = estimate_cell(cell("model=qwen2.5-7b", "recipe=standard", "model.precision=fp32"))
    checkpointed = estimate_cell(cell("model=qwen2.5-7b", "recipe=standard", "model.gradient_checkpointing=true"))
    assert nf4.weights_gib < int8.weights_gib < bf16.weights_gib < fp32.weights_gib
    assert checkpointed.activations_gib < bf16.activations_gib / 5
    # Mixtral's experts are split into 4-bit Linear modules once loaded, after loading in 16 bits
    mixtral = cell("model=mixtral-8x7b")
    split = estimate_cell(mixtral)
    assert mixtral.model.quantization == "nf4" and split.experts == "per-expert nf4"
    assert split.weights_gib < 25 and split.load_gib > 80 and split.peak_phase == "load"
    fused = estimate_cell(cell("model=mixtral-8x7b", "model.quantization=none"))
    assert fused.experts == "fused fp16" and fused.load_gib == 0 and fused.weights_gib > 80
    assert estimate_cell(cell("model=qwen2.5-7b")).experts is None
    on_one = estimate_cell(cell("model=mixtral-8x7b", "model.resources.gpus=1"))
    assert on_one.per_gpu_gib == pytest.approx(4 * estimate_cell(mixtral).per_gpu_gib)


def test_a_model_of_unknown_size_gets_no_estimate_and_a_nominal_size_a_rough_one():
    assert nominal_params("135M") == 135e6 and nominal_params("3.8B") == 3.8e9 and nominal_params("tiny") is None
    assert estimate_cell(cell("model=tiny-llama")) is None
    exact = estimate_cell(cell("model=llama-3.1-8b"))
    rough = estimate_cell(cell("model=llama-3.1-8b", "model.shape.hidden_size=0"))
    assert rough.rough and 0.5 < rough.peak_gib / exact.peak_gib < 2


def plan(capsys, *overrides) -> tuple[str, str]:
    assert cli.main(["plan", "campaign=smoke", "campaign.seeds=[1]", "campaign.recipes=[standard]",
                     "cluster=leonardo", *overrides]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_plan_warns_before_submission_when_a_cell_cannot_fit_its_gpus(capsys):
    out, err = plan(capsys, "campaign.models=[qwen2.5-7b,mixtral-8x7b]")
    assert "GiB/GPU" in out and "will not fit" not in err
    assert "GiB/GPU (load), experts per-expert nf4" in out and out.count("experts") == 1
    out, err = plan(capsys, "campaign.models=[qwen2.5-72b,qwen2.5-7b]", "model.quantization=none")
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and "qwen2.5-72b/standard" in warnings[0]
    assert "estimated peak" in warnings[0] and "of leonardo's 64 GiB per GPU" in warnings[0]
    assert "model.quantization=nf4" in warnings[0] and "1 cell(s) will not fit" in out
    _, err = plan(capsys, "campaign.models=[mixtral-8x7b]", "model.resources.gpus=1")
    assert "mixtral-8x7b/standard" in err and "raise model.resources.gpus" in err
    assert "(load: weights 85.1 before the experts are split into per-expert nf4," in err
    # more GPUs than a node has is no estimate but a request that can never be met: plan fails
    assert cli.main(["plan", "campaign=smoke", "campaign.seeds=[1]", "campaign.recipes=[standard]", "cluster=leonardo",
                     "campaign.models=[mixtral-8x7b]", "model.resources.gpus=8"]) == 2
    assert "asks for 8 GPUs but leonardo nodes have 4" in capsys.readouterr().err


def test_the_memory_plan_imports_no_torch():
    code = "import sys, aletheia_hpc.campaign.memory; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
