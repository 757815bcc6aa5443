"""QLoRA on a CPU through bitsandbytes: 4-bit and 8-bit loading and training, the probe on quantized
weights, selective checkpointing under peft's k-bit preparation, and precision checks.

bitsandbytes trains on CPUs in train mode. In eval mode without gradients its 4-bit CPU kernel repacks
the weights, which fails when a layer's out_features is not a multiple of 32; every tiny model's
quantized layers have 32, 64, 128 or 192 outputs, so held-out evaluation works here too.
"""

import bitsandbytes as bnb
import pytest
import torch
from peft import prepare_model_for_kbit_training
from scipy.stats import spearmanr

from aletheia_hpc.campaign.matrix import compose_root
from aletheia_hpc.config import ConfigError, ModelConfig, ResourcesConfig, validate_cell
from aletheia_hpc.method import apply_lora, enable_selective_checkpointing, family_of, probe_layer_scores
from aletheia_hpc.models.loading import DeviceError, check_device_support, load_model, resolve_device
from aletheia_hpc.models.tiny import build_tiny_model
from aletheia_hpc.models.tokenizer import tiny_tokenizer
from aletheia_hpc.worker.cell import run_cell
from tests.conftest import probe_batches
from tests.test_method import _grad_reaches
from tests.test_worker import make_cell

QUANTIZED_LINEAR = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
CPU = torch.device("cpu")


def tiny_cfg(quantization="none", precision="fp32") -> ModelConfig:
    return ModelConfig(name="tiny-llama", family="llama", kind="tiny", num_layers=6, params="tiny",
                       precision=precision, quantization=quantization, resources=ResourcesConfig(gpus=0))


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_loading_quantizes_every_layer_linear_and_nothing_else(quantization):
    model, _ = load_model(tiny_cfg(quantization=quantization), CPU)
    family = family_of(model)
    for name in family.attention_targets(range(6)) + family.mlp_module_targets(range(6)):
        assert isinstance(model.get_submodule(name), QUANTIZED_LINEAR[quantization]), name
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    if quantization == "nf4":
        q_proj = model.model.layers[0].self_attn.q_proj
        state = q_proj.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # double quantization
        assert q_proj.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("quantization, checkpointing", [("nf4", True), ("int8", False)])
def test_quantized_cell_trains_and_lowers_the_held_out_loss(tmp_path, quantization, checkpointing):
    common = ["model=tiny-llama", f"model.quantization={quantization}",
              f"model.gradient_checkpointing={checkpointing}", "model.lr=1e-2", "model.max_seq_len=64",
              "train.steps=4", "train.grad_accum=1", "recipe.probe.batches=2", "data.eval_size=16"]
    row = run_cell(make_cell(*common, "recipe=aletheia"), tmp_path, progress=False)
    assert row["status"] == "ok" and row["train_steps"] == row["planned_steps"]
    assert len(row["layer_scores"]) == 6 and all(s > 0 for s in row["layer_scores"])
    assert row["config"]["model"]["quantization"] == quantization
    base = run_cell(make_cell(*common, "recipe=base"), tmp_path, progress=False)
    assert row["eval_loss"] < base["eval_loss"]


def _layered_tiny_model(family: str, layers: int, folder) -> None:
    """A tiny model whose layers' weight matrices are scaled by random factors, saved to ``folder``:
    a random net's scores simply fall with depth, scaled layers give the probe an order to recover."""
    model = build_tiny_model(family, layers)
    scales = torch.empty(layers).uniform_(0.3, 3.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for scale, layer in zip(scales, model.get_submodule(family_of(model).layers_path)):
            for param in layer.parameters():
                if param.ndim >= 2:
                    param.mul_(scale)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


@pytest.mark.parametrize("family, quantization", [("llama", "nf4"), ("mixtral", "nf4"), ("llama", "int8")])
def test_quantized_probe_ranks_layers_like_the_unquantized_probe(tmp_path, family, quantization):
    layers = 8
    _layered_tiny_model(family, layers, tmp_path)
    cfg = dict(name="layered", family=family, kind="local", path=str(tmp_path), num_layers=layers,
               precision="fp32")
    batches = probe_batches(n=2, batch=2, length=16)
    reference = probe_layer_scores(load_model(ModelConfig(**cfg), CPU)[0], batches)
    quantized, _ = load_model(ModelConfig(**cfg, quantization=quantization), CPU)
    scores = probe_layer_scores(quantized, batches)
    rho = spearmanr(reference, scores).statistic
    worst = max(abs(q - r) / r for q, r in zip(scores, reference))
    print(f"{family} {quantization}: Spearman rho {rho:.3f}, worst per-layer relative difference {worst:.3f}")
    assert len(scores) == layers and all(s > 0 for s in scores)
    assert rho >= 0.9
    # the score includes the packed weights: without them it would be a fraction of the reference
    assert worst < 0.15
    chunked = probe_layer_scores(quantized, batches, mode="chunked", chunk_size=3)
    assert max(abs(a - b) / b for a, b in zip(chunked, scores)) < 1e-5
    assert all(p.grad is None for p in quantized.parameters())


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")  # peft's call, shown failing on purpose
def test_checkpointing_stays_selective_on_a_kbit_model():
    batch = probe_batches(n=1, pad_last=False)[0]
    cfg = tiny_cfg(quantization="nf4")
    family = family_of(build_tiny_model("llama", 2))
    # peft's preparation turns on checkpointing with input gradients: backward reaches every layer
    naive = apply_lora(prepare_model_for_kbit_training(load_model(cfg, CPU)[0]), family, [3, 5])
    assert all(_grad_reaches(naive, family, batch).values())

    # after peft's preparation (a library user's path) and without it (the worker's)
    for prepare in (prepare_model_for_kbit_training, lambda model: model):
        model = apply_lora(prepare(load_model(cfg, CPU)[0]), family, [3, 5])
        enable_selective_checkpointing(model)
        assert model.get_base_model().is_gradient_checkpointing
        reached = _grad_reaches(model, family, batch)
        assert [reached[i] for i in range(6)] == [False, False, False, True, True, True]
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(family.layer_of(n) in (3, 5) for n in grads)


@pytest.mark.parametrize("precision, quantization, asked, visible, bf16, fix", [
    ("fp16", "none", 0, 0, False, "model.precision=fp32"),
    ("bf16", "none", 1, 1, False, "model.precision=fp16"),
    ("fp16", "nf4", 1, 1, False, "model.quantization=int8"),
    ("bf16", "none", 4, 2, True, "CUDA_VISIBLE_DEVICES"),
])
def test_a_machine_that_cannot_serve_the_config_is_refused_before_loading(precision, quantization, asked,
                                                                          visible, bf16, fix):
    cfg = ModelConfig(name="m", family="llama", num_layers=2, precision=precision, quantization=quantization,
                      resources=ResourcesConfig(gpus=asked))
    with pytest.raises(DeviceError, match=fix):
        check_device_support(cfg, cuda_devices=visible, bf16_supported=bf16, gpu_name="Tesla V100")


def test_supported_precisions_pass_and_this_cpu_resolves():
    four = ModelConfig(name="m", family="mixtral", num_layers=2, precision="fp16", quantization="nf4",
                       resources=ResourcesConfig(gpus=4))
    check_device_support(four, cuda_devices=4, bf16_supported=True)
    check_device_support(ModelConfig(name="m", family="llama", num_layers=2, precision="fp16"),
                         cuda_devices=1, bf16_supported=False)  # fp16 and int8 need no bf16
    if not torch.cuda.is_available():
        assert resolve_device(tiny_cfg()) == CPU
        with pytest.raises(DeviceError, match="precision=fp16 needs a CUDA GPU"):
            resolve_device(tiny_cfg(precision="fp16"))


def test_quantization_and_precision_are_overridable_and_checked_at_plan_time():
    cell = make_cell("model=tiny-llama", "model.quantization=nf4")
    assert cell.model.quantization == "nf4"
    validate_cell(cell)
    with pytest.raises(ConfigError, match=r"model.quantization='nf5': use one of \('none', 'nf4', 'int8'\)"):
        validate_cell(make_cell("model=tiny-llama", "model.quantization=nf5"))
    with pytest.raises(ConfigError, match="model.precision=fp16 with model.resources.gpus=0"):
        validate_cell(make_cell("model=tiny-llama", "model.precision=fp16"))
    assert compose_root(["model=mixtral-8x7b"]).model.resources.gpus == 4
