"""Mixtral's fused experts split into per-expert Linear modules, held in 4 (or 8) bits by bitsandbytes
on the CPU, with LoRA on every expert (models/moe_experts.py).

A random-init tiny Mixtral (4 experts, top-2) stands in for Mixtral-8x7B: same modelling code, same
fused layout. bitsandbytes' CPU 4-bit kernel repacks a layer's weights the first time it runs in
eval mode without gradients, after which backward through it is no longer differentiated; each test
that trains therefore loads its own copy and trains it before any eval-mode forward.
"""

import copy
import tempfile

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from aletheia_hpc.campaign.memory import QUANTIZED_BYTES
from aletheia_hpc.config import ModelConfig, ResourcesConfig
from aletheia_hpc.method import apply_lora, get_family
from aletheia_hpc.method.lora import adapted_modules
from aletheia_hpc.models.experts_layout import planned_experts_label
from aletheia_hpc.models.loading import load_model, quantization_config
from aletheia_hpc.models.moe_experts import (ExpertsLayoutError, PerExpertLinears, experts_in,
                                             experts_weight_bytes, family_for, split_fused_experts)
from aletheia_hpc.models.tiny import build_tiny_model
from aletheia_hpc.worker.cell import run_cell
from tests.test_worker import make_cell

CPU = torch.device("cpu")
LAYERS, EXPERTS = 2, 4
QUANTIZED_LINEAR = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def mixtral_cfg(quantization: str) -> ModelConfig:
    return ModelConfig(name="tiny-mixtral", family="mixtral", kind="tiny", num_layers=LAYERS, params="tiny",
                       precision="fp32", quantization=quantization, resources=ResourcesConfig(gpus=0))


def tokens(batch: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(4, 200, (batch, length), generator=torch.Generator().manual_seed(0))


def experts_modules(model) -> list[PerExpertLinears]:
    return [m for m in model.modules() if isinstance(m, PerExpertLinears)]


def test_unquantized_split_computes_the_fused_models_logits_exactly():
    fused = build_tiny_model("mixtral", LAYERS)
    split = copy.deepcopy(fused)
    assert split_fused_experts(split, None) == LAYERS
    assert experts_in(fused) == "fused fp32" and experts_in(split) == "per-expert fp32"
    assert experts_weight_bytes(split) == experts_weight_bytes(fused)
    ids = tokens()
    with torch.no_grad():
        grouped = fused(ids).logits  # transformers' default experts kernel (grouped_mm)
        fused.set_experts_implementation("eager")
        eager = fused(ids).logits
        got = split(ids).logits
    # the split module runs the eager forward step for step: bit-identical
    assert torch.equal(got, eager)
    torch.testing.assert_close(got, grouped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_load_holds_every_expert_in_its_bits(quantization):
    fused, _ = load_model(mixtral_cfg("none"), CPU)
    model, _ = load_model(mixtral_cfg(quantization), CPU)
    layers = experts_modules(model)
    assert len(layers) == LAYERS and all(m.num_experts == EXPERTS for m in layers)
    for experts in layers:
        for e in range(EXPERTS):
            for linear in (experts.expert(e).gate_up_proj, experts.expert(e).down_proj):
                assert isinstance(linear, QUANTIZED_LINEAR[quantization])
    if quantization == "nf4":
        state = layers[0].expert(0).gate_up_proj.weight.quant_state
        assert state.quant_type == "nf4" and state.nested and state.shape == torch.Size([256, 64])
    assert experts_in(model) == f"per-expert {quantization}" == planned_experts_label(quantization, "fp32")
    assert not any(p.ndim == 3 for p in model.parameters())  # no fused tensor left behind

    before, after = experts_weight_bytes(fused), experts_weight_bytes(model)
    params = before // 4  # fp32
    print(f"{quantization}: experts {before} bytes fused fp32 -> {after} bytes per-expert "
          f"({after / params:.4f} bytes per weight)")
    if quantization == "nf4":  # the memory plan's bytes per 4-bit weight, statistics included
        assert after / params == pytest.approx(QUANTIZED_BYTES["nf4"], rel=0.01)
    else:  # one byte per weight (the plan's figure) and an fp32 scale per output row
        rows = LAYERS * EXPERTS * (2 * 128 + 64)
        assert after == params * QUANTIZED_BYTES["int8"] + 4 * rows


def test_nf4_experts_give_the_fused_models_logits_within_quantization_error():
    reference = build_tiny_model("mixtral", LAYERS)
    qconfig = quantization_config(mixtral_cfg("nf4"))
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        # attention in nf4, experts still fused fp32: what a quantized load gave before the split
        fused = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=qconfig)
        split = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=qconfig)
    split_fused_experts(split, qconfig)
    dequantized = copy.deepcopy(fused)
    with torch.no_grad():
        for name, experts in split.named_modules():
            if isinstance(experts, PerExpertLinears):
                target = dequantized.get_submodule(name)
                for e in range(EXPERTS):
                    for projection in ("gate_up_proj", "down_proj"):
                        weight = getattr(experts.expert(e), projection).weight
                        getattr(target, projection)[e] = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    ids = tokens()
    for model in (reference, fused, dequantized, split):
        model.eval()
    with torch.no_grad():
        exact, before, rebuilt, got = (m(ids).logits for m in (reference, fused, dequantized, split))
    expert_error = (got - before).abs().max().item()
    attention_error = (before - exact).abs().max().item()
    compute_error = (got - rebuilt).abs().max().item()
    print(f"max |logit difference|: nf4 attention vs all fp32 {attention_error:.4f}; nf4 experts on top "
          f"{expert_error:.4f}; vs fused with the dequantized experts {compute_error:.5f} (bf16 compute); "
          f"logits up to {exact.abs().max().item():.2f}")
    assert expert_error > 0  # the experts really are quantized now
    # all that differs from the fused model holding the dequantized weights is bf16 compute
    assert compute_error < expert_error / 5
    torch.testing.assert_close(got, rebuilt, rtol=0, atol=0.02)
    # 4 bits on the experts cost about what 4 bits on attention, which QLoRA always had, already cost
    assert expert_error < 3 * attention_error


def test_lora_adapts_every_expert_gradients_reach_it_and_a_step_trains_it():
    model, _ = load_model(mixtral_cfg("nf4"), CPU)
    family = family_for(model, get_family("mixtral"))
    assert family.mlp_parameters == () and f"mlp.experts.{EXPERTS - 1}.down_proj" in family.mlp
    peft_model = apply_lora(model, family, [1])  # verifies the placement itself
    expert_adapters = {n for n in adapted_modules(peft_model) if "experts" in n}
    assert expert_adapters == {f"model.layers.1.mlp.experts.{e}.{p}" for e in range(EXPERTS)
                               for p in ("gate_up_proj", "down_proj")}
    for e in range(EXPERTS):  # the adapters sit on the 4-bit modules themselves
        wrapped = peft_model.get_submodule(f"base_model.model.model.layers.1.mlp.experts.{e}.gate_up_proj")
        assert isinstance(wrapped.base_layer, bnb.nn.Linear4bit)

    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    frozen = peft_model.get_submodule("base_model.model.model.layers.1.mlp.experts.0.down_proj.base_layer")
    packed = frozen.weight.data.clone()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = tokens()
    peft_model.train()
    losses = []
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        if not losses:  # lora_B starts at zero, so its gradient is the one that reaches the expert first
            for e in range(EXPERTS):
                for p in ("gate_up_proj", "down_proj"):
                    name = f"base_model.model.model.layers.1.mlp.experts.{e}.{p}.lora_B.default.weight"
                    assert trainable[name].grad is not None and trainable[name].grad.abs().sum() > 0, name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    moved = [n for n in trainable if "experts" in n and not torch.equal(trainable[n], start[n])]
    assert len(moved) == 2 * 2 * EXPERTS  # lora_A and lora_B of both projections of every expert
    assert torch.equal(frozen.weight.data, packed)  # the 4-bit base weights are not trained
    assert losses[-1] < losses[0]


def test_a_quantized_mixtral_cell_trains_its_experts_and_its_row_says_so(tmp_path):
    common = ["model=tiny-mixtral", "model.num_layers=2", "model.quantization=nf4", "model.max_seq_len=64",
              "train.steps=2", "train.grad_accum=1", "data.eval_size=8"]
    row = run_cell(make_cell(*common, "recipe=standard"), tmp_path, progress=False)
    assert row["status"] == "ok" and row["train_steps"] == 2, row.get("error")
    assert row["experts"] == "per-expert nf4"
    # attention (4 x r 16) and 4 experts x 2 projections (r 64) per layer, both layers
    hidden, inter = 64, 128
    attention = 16 * (2 * hidden + 2 * (hidden + 32) + 2 * hidden)
    experts = 64 * EXPERTS * ((hidden + 2 * inter) + (inter + hidden))
    assert row["trainable_params"] == LAYERS * (attention + experts)
    unquantized = run_cell(make_cell(*common[:2], "recipe=base"), tmp_path, progress=False)
    assert unquantized["experts"] == "fused fp32"


def test_fused_layouts_other_than_mixtrals_are_refused():
    model = build_tiny_model("mixtral", LAYERS)
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(ExpertsLayoutError, match=r"model\.layers\.1\.mlp\.experts.*is_transposed.*quantization=none"):
        split_fused_experts(model, None)
    assert experts_in(model) == "fused fp32"  # refused before anything was replaced


def test_the_report_says_which_form_the_experts_trained_in(tmp_path):
    from aletheia_hpc.aggregate import aggregate_campaign
    from tests.test_aggregate import CAMPAIGN, make_row, write_campaign

    rows = [make_row("mixtral-8x7b", recipe, 1, family="mixtral", experts="per-expert nf4")
            for recipe in ("standard", "aletheia")]
    rows += [make_row("qwen2.5-0.5b", recipe, 1) for recipe in ("standard", "aletheia")]
    write_campaign(tmp_path, rows)
    report = aggregate_campaign(tmp_path, CAMPAIGN, expected_cells=len(rows), figures=False).report_md.read_text()
    assert "- mixture-of-experts experts held as per-expert nf4 (2 runs)\n" in report
    fused = [dict(r, experts="fused bf16") if r["model"] == "mixtral-8x7b" and r["recipe"] == "standard" else r
             for r in rows]
    write_campaign(tmp_path, fused)
    report = aggregate_campaign(tmp_path, CAMPAIGN, expected_cells=len(rows), figures=False).report_md.read_text()
    assert ("held as fused bf16 (1 runs), per-expert nf4 (1 runs); fused experts are not quantized, unlike the "
            "paper's Mixtral (QLoRA 4-bit)") in report
