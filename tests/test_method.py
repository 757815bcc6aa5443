"""The method library on every architecture family: registry, probe, selection, adapter placement."""

import pytest
import torch

from aletheia_hpc.method import (AdapterPlacementError, FamilySpec, LoraRanks, QuantizedProbeError,
                                 UnknownFamily, adapted_modules, apply_lora, enable_selective_checkpointing,
                                 expected_adapters, family_of, get_family, num_layers, probe_layer_scores,
                                 register_family, select_layers, verify_adapters)
from aletheia_hpc.models.tiny import TINY_FAMILIES, build_tiny_model
from tests.conftest import probe_batches

LAYERS = 10


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request):
    return build_tiny_model(request.param, num_layers=LAYERS)


def test_family_resolves_from_model_type_and_counts_layers(tiny):
    family = family_of(tiny)
    assert num_layers(tiny, family) == LAYERS
    layer_of = {family.layer_of(n) for n, _ in tiny.named_parameters()}
    assert layer_of - {None} == set(range(LAYERS))
    # embeddings and the LM head are outside the layer stack
    assert any(family.layer_of(n) is None for n, _ in tiny.named_parameters())


def test_layer_index_is_not_confused_by_prefixes():
    llama = get_family("llama")
    assert llama.layer_of("base_model.model.model.layers.11.mlp.up_proj.weight") == 11
    assert llama.layer_of("model.layers.1.self_attn.q_proj.weight") == 1
    assert llama.layer_of("model.embed_tokens.weight") is None
    assert get_family("gptj").layer_of("transformer.h.3.attn.out_proj.weight") == 3
    assert get_family("gpt_neox").layer_of("gpt_neox.layers.7.attention.dense.bias") == 7


def test_unknown_family_names_it_and_says_how_to_register():
    with pytest.raises(UnknownFamily) as err:
        get_family("bloom")
    assert "bloom" in str(err.value) and "register_family" in str(err.value)


def test_register_family_makes_a_new_architecture_usable():
    spec = register_family(FamilySpec("llama_alias", ("llama_alias_type",), "model.layers",
                                      ("self_attn.q_proj",), ("mlp.down_proj",)))
    assert get_family("llama_alias_type") is spec
    model = build_tiny_model("llama", num_layers=3)
    peft_model = apply_lora(model, spec, [2])
    assert set(adapted_modules(peft_model)) == {"model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"}


def test_probe_modes_agree_and_leave_the_model_untouched(tiny, batches):
    family = family_of(tiny)
    for name, param in tiny.named_parameters():  # an arbitrary frozen/trainable mix to restore
        param.requires_grad_(hash(name) % 2 == 0)
    tiny.train()
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    single = probe_layer_scores(tiny, batches, family=family)
    chunked = probe_layer_scores(tiny, batches, family=family, mode="chunked", chunk_size=3)
    assert len(single) == LAYERS and all(s > 0 for s in single)
    worst = max(abs(a - b) / abs(b) for a, b in zip(single, chunked))
    assert worst < 1e-6, f"single-pass vs chunked relative difference {worst}"
    assert tiny.training
    assert {n: p.requires_grad for n, p in tiny.named_parameters()} == flags
    assert all(p.grad is None for p in tiny.parameters())


def test_probe_masks_padding_out_of_the_loss():
    model = build_tiny_model("llama", num_layers=4)
    short = probe_batches(n=1, batch=1, length=8, pad_last=False)
    padded = {"input_ids": torch.cat([short[0]["input_ids"], torch.full((1, 5), 7)], dim=1),
              "attention_mask": torch.cat([torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], dim=1)}
    a = probe_layer_scores(model, short)
    b = probe_layer_scores(model, [padded])
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 1e-5


def test_probe_refuses_quantized_weights_instead_of_skipping_them():
    model = build_tiny_model("llama", num_layers=2)
    layer = model.model.layers[1].mlp.down_proj
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(QuantizedProbeError, match="down_proj"):
        probe_layer_scores(model, probe_batches(n=1))


def test_select_top_half_sorted_and_deterministic_on_ties():
    scores = [0.5, 3.0, 3.0, 0.1, 2.0, 3.0]
    assert select_layers(scores, 50) == [1, 2, 5]
    assert select_layers(scores, 50) == select_layers(list(scores), 50)
    assert select_layers([1.0] * 6, 50) == [0, 1, 2]  # ties break towards the lower index
    assert select_layers(scores, 100) == list(range(6))
    assert select_layers(scores, 1) == [1]  # at least one layer
    assert select_layers(list(range(7)), 50) == [3, 4, 5, 6]  # 3.5 rounds half up
    assert select_layers(scores, 50, "bottom") == [0, 3, 4]
    assert select_layers(scores, 50, "last") == [3, 4, 5]
    picks = {seed: select_layers(list(range(12)), 50, "random", seed=seed) for seed in range(8)}
    assert all(len(set(p)) == 6 and p == sorted(p) and set(p) <= set(range(12)) for p in picks.values())
    assert picks[1] == select_layers(list(range(12)), 50, "random", seed=1)  # a seed fixes the pick
    assert len({tuple(p) for p in picks.values()}) > 1  # and different seeds pick differently


def test_tiny_models_are_fixed_by_their_own_seed_and_leave_the_cell_seed_to_lora():
    family = get_family("llama")
    torch.manual_seed(1)
    after_one = torch.rand(3)
    torch.manual_seed(1)
    model_one = build_tiny_model("llama", num_layers=2)
    assert torch.equal(torch.rand(3), after_one)  # building drew nothing from the global RNG
    torch.manual_seed(1)
    lora_one = apply_lora(build_tiny_model("llama", num_layers=2), family, [0])
    torch.manual_seed(2)
    lora_two = apply_lora(build_tiny_model("llama", num_layers=2), family, [0])
    base = dict(model_one.named_parameters())
    two = dict(lora_two.get_base_model().named_parameters())
    assert all(torch.equal(p, two[n]) for n, p in base.items() if n in two)  # same base weights
    a_one = {n: p for n, p in lora_one.named_parameters() if "lora_A" in n}
    a_two = dict(lora_two.named_parameters())
    assert a_one and not any(torch.equal(p, a_two[n]) for n, p in a_one.items())  # seeded adapters differ


@pytest.mark.parametrize("pct", [0, -5, 100.5, 250])
def test_select_rejects_percentages_outside_0_100(pct):
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        select_layers([1.0, 2.0], pct)


def test_adapters_land_exactly_on_selected_layers_with_asymmetric_ranks(tiny):
    family = family_of(tiny)
    layers = [1, 4, 9]
    peft_model = apply_lora(tiny, family, layers, LoraRanks(attention=16, mlp=64))
    got = adapted_modules(peft_model)
    assert got == expected_adapters(family, layers, LoraRanks(16, 64))
    assert {family.layer_of(name) for name in got} == set(layers)
    assert {got[n] for n in family.attention_targets(layers)} == {16}
    mlp = family.mlp_module_targets(layers) + family.mlp_parameter_targets(layers)
    assert mlp and {got[n] for n in mlp} == {64}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and family.layer_of(n) in layers for n in trainable)


@pytest.mark.parametrize("modules", ["attention", "mlp"])
def test_a_module_set_puts_adapters_on_those_projections_only(tiny, modules):
    family = family_of(tiny)
    ranks = LoraRanks(attention=16, mlp=64, modules=modules)
    got = adapted_modules(apply_lora(tiny, family, [0, 3], ranks))
    attention = set(family.attention_targets([0, 3]))
    mlp = set(family.mlp_module_targets([0, 3]) + family.mlp_parameter_targets([0, 3]))
    assert set(got) == (attention if modules == "attention" else mlp)
    assert set(got.values()) == {16 if modules == "attention" else 64}


def test_mixtral_experts_are_adapted_per_layer_not_everywhere():
    model = build_tiny_model("mixtral", num_layers=12)
    family = family_of(model)
    peft_model = apply_lora(model, family, [1])
    expert_adapters = {n for n in adapted_modules(peft_model) if "experts" in n}
    # "layers.1." must not also catch layers 10 and 11
    assert expert_adapters == {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"}


def test_verification_fails_loudly_when_adapters_differ_from_the_selection():
    model = build_tiny_model("qwen2", num_layers=4)
    family = family_of(model)
    peft_model = apply_lora(model, family, [0, 2])
    with pytest.raises(AdapterPlacementError, match="extra"):
        verify_adapters(peft_model, family, [0])
    with pytest.raises(AdapterPlacementError, match="wrong_rank"):
        verify_adapters(peft_model, family, [0, 2], LoraRanks(attention=8, mlp=64))


@pytest.mark.parametrize("field,value", [("attention", 0), ("mlp", -4)])
def test_non_positive_rank_is_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} rank must be a positive integer"):
        LoraRanks(**{field: value})


def _grad_reaches(model, family, batch):
    """Which layers' outputs take part in backward (their output requires grad)."""
    reached = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out, i=i: reached.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).requires_grad))
        for i, layer in enumerate(model.get_base_model().model.layers)]
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    return reached


def test_checkpointing_keeps_backward_above_the_lowest_adapted_layer():
    batch = probe_batches(n=1, pad_last=False)[0]
    family = get_family("llama")
    # transformers' own switch turns on an input-requires-grad hook: backward reaches every layer.
    naive = apply_lora(build_tiny_model("llama", num_layers=6), family, [3, 5])
    naive.get_base_model().activation_checkpointing_enable()
    assert all(_grad_reaches(naive, family, batch).values())

    model = apply_lora(build_tiny_model("llama", num_layers=6), family, [3, 5])
    enable_selective_checkpointing(model)
    assert model.get_base_model().is_gradient_checkpointing
    reached = _grad_reaches(model, family, batch)
    assert [reached[i] for i in range(6)] == [False, False, False, True, True, True]
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(family.layer_of(n) in (3, 5) for n in grads)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gptj", "gpt_neox"])
def test_tensor_sum_probe_equals_the_authors_gradient_probe(family):
    """Our ``norm="tensor_sum"`` over every token is the paper authors' own probe (aletheia-lora 0.1.2,
    ``gradient_probe``: 5 batches of one sequence, per-tensor gradient norms summed, chunks of 8)."""
    import copy

    from aletheia_lora.probe import gradient_probe

    model = build_tiny_model(family, num_layers=LAYERS)
    g = torch.Generator().manual_seed(3)
    sequences = [{"input_ids": torch.randint(0, 200, (n,), generator=g), "attention_mask": torch.ones(n, dtype=torch.long)}
                 for n in (12, 9, 16, 7, 11)]
    theirs = gradient_probe(copy.deepcopy(model), sequences, num_layers=LAYERS, probe_batches=5, chunk_size=8)
    batches = [{k: v.unsqueeze(0) for k, v in s.items()} for s in sequences]
    ours = probe_layer_scores(model, batches, norm="tensor_sum")
    worst = max(abs(ours[i] - theirs[i]) / theirs[i] for i in range(LAYERS))
    assert worst < 1e-5, f"tensor_sum vs aletheia-lora relative difference {worst}"
    whole_layer = probe_layer_scores(model, batches, norm="layer")
    assert max(abs(whole_layer[i] - theirs[i]) / theirs[i] for i in range(LAYERS)) > 1e-3  # the definitions differ
    chunked = probe_layer_scores(model, batches, norm="tensor_sum", mode="chunked", chunk_size=4)
    assert max(abs(a - b) / b for a, b in zip(chunked, ours)) < 1e-6


def test_middle_k_takes_the_centre_of_the_stack():
    assert select_layers([1.0] * 30, 50, "middle") == list(range(8, 23))
    assert select_layers([1.0] * 10, 50, "middle") == [3, 4, 5, 6, 7]
    assert select_layers([1.0] * 9, 34, "middle") == [3, 4, 5]
