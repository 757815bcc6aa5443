"""Loading the model a cell names: hub id, local directory, GGUF file, or a tiny test model.

Precision (``model.precision``): bf16 (the paper's choice for Qwen and Phi) and fp16 need a CUDA GPU;
fp16 trains with loss scaling (the Trainer's fp16 mode); fp32 is for CPUs. A GPU without bf16 (pre-
Ampere) is refused before anything loads, naming the fix, rather than failing inside a step.

Quantization (``model.quantization``, QLoRA): ``nf4`` loads linear weights as 4-bit NF4 with double
quantization and bf16 compute, ``int8`` as LLM.int8, both through bitsandbytes (which also runs on
CPUs). bitsandbytes quantizes nn.Linear modules only, so a quantized model's fused MoE expert tensors
(Mixtral) are split after loading into one Linear per expert, quantized the same way
(models/moe_experts.py).

Placement: a cell with ``model.resources.gpus > 1`` is spread over that many GPUs by accelerate
(device_map="auto", balanced, with a per-GPU memory cap); anything else sits on one device.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from aletheia_hpc.config import ModelConfig
from aletheia_hpc.models.experts_layout import PER_EXPERT, experts_layout
from aletheia_hpc.models.moe_experts import split_fused_experts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Share of each GPU that weights may take when a model is spread over several; the rest is left
# for activations, adapters and optimizer state.
WEIGHT_SHARE_PER_GPU = 0.85


class DeviceError(RuntimeError):
    """The machine cannot run the cell as configured (precision, GPU count); says what to change."""


def check_device_support(model_cfg: ModelConfig, *, cuda_devices: int, bf16_supported: bool,
                         gpu_name: str = "", cpu_fallback: bool = False) -> None:
    """Raise DeviceError if the model's precision/quantization/GPU count cannot run on a machine with
    ``cuda_devices`` visible GPUs (0: CPU only) whose bf16 support is ``bf16_supported``.

    A cell that asked for GPUs and finds none is refused unless ``cpu_fallback``: run on the CPU,
    its step times would sit beside GPU-timed cells in the same paired comparison."""
    name = model_cfg.name
    if cuda_devices == 0:
        if model_cfg.resources.gpus > 0 and not cpu_fallback:
            raise DeviceError(f"model {name}: model.resources.gpus={model_cfg.resources.gpus} but no CUDA GPU is "
                              "visible; run the cell where its GPUs are (a GPU node, or cluster=<a SLURM "
                              "profile>), or on the CPU with model.resources.gpus=0 model.precision=fp32")
        if model_cfg.precision == "fp16":
            raise DeviceError(f"model {name}: precision=fp16 needs a CUDA GPU (loss-scaled fp16 training); "
                              "on a CPU set model.precision=fp32")
        return
    if not bf16_supported:
        if model_cfg.precision == "bf16":
            raise DeviceError(f"model {name}: precision=bf16 but this GPU ({gpu_name}) lacks bf16; "
                              "set model.precision=fp16 (trained with loss scaling)")
        if model_cfg.quantization == "nf4":
            raise DeviceError(f"model {name}: quantization=nf4 computes in bf16, which this GPU ({gpu_name}) "
                              "lacks; use model.quantization=int8 or a GPU with bf16 (Ampere or newer)")
    if model_cfg.resources.gpus > cuda_devices:
        raise DeviceError(f"model {name}: model.resources.gpus={model_cfg.resources.gpus} but only "
                          f"{cuda_devices} GPU(s) are visible (CUDA_VISIBLE_DEVICES); request them from the "
                          "scheduler or lower model.resources.gpus")


def resolve_device(model_cfg: ModelConfig, *, cpu_fallback: bool = False) -> torch.device:
    """cuda when present, else cpu; a precision or GPU count the machine cannot serve is refused here
    (``cpu_fallback``: a cell that asked for GPUs may run on the CPU when there are none)."""
    cuda = torch.cuda.is_available()
    check_device_support(model_cfg, cuda_devices=torch.cuda.device_count() if cuda else 0,
                         bf16_supported=cuda and torch.cuda.is_bf16_supported(),
                         gpu_name=torch.cuda.get_device_name() if cuda else "", cpu_fallback=cpu_fallback)
    return torch.device("cuda" if cuda else "cpu")


def quantization_config(model_cfg: ModelConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for model.quantization (None for ``none``)."""
    if model_cfg.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def spans_gpus(model_cfg: ModelConfig, device: torch.device) -> bool:
    return device.type == "cuda" and model_cfg.resources.gpus > 1


def device_placement(model_cfg: ModelConfig, device: torch.device) -> tuple[str | dict, dict | None]:
    """(device_map, max_memory) for from_pretrained: balanced over the cell's GPUs when it asks for
    more than one, else everything on ``device``."""
    if spans_gpus(model_cfg, device):
        max_memory = {i: int(torch.cuda.get_device_properties(i).total_memory * WEIGHT_SHARE_PER_GPU)
                      for i in range(model_cfg.resources.gpus)}
        return "auto", max_memory
    return {"": (device.index or 0) if device.type == "cuda" else "cpu"}, None


def model_directory(model_cfg: ModelConfig) -> str:
    """The from_pretrained argument for hub, local and GGUF models (GGUF: converted once, cached)."""
    if model_cfg.kind == "gguf":
        from aletheia_hpc.models.gguf_cache import converted_model_dir, find_packaged_gguf

        if model_cfg.path.startswith("package:"):
            gguf = find_packaged_gguf(model_cfg.path.removeprefix("package:"))
        else:
            gguf = Path(model_cfg.path)
        return str(converted_model_dir(gguf))
    return model_cfg.path


def _from_pretrained(source: str, model_cfg: ModelConfig, device: torch.device, revision: str | None = None):
    device_map, max_memory = device_placement(model_cfg, device)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[model_cfg.precision], device_map=device_map,
                                                 max_memory=max_memory, revision=revision,
                                                 quantization_config=quantization_config(model_cfg))
    if experts_layout(model_cfg.quantization) == PER_EXPERT:
        split_fused_experts(model, quantization_config(model_cfg))
    offloaded = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()} & {"cpu", "disk"})
    if device.type == "cuda" and offloaded:
        raise DeviceError(f"model {model_cfg.name} does not fit on {max(model_cfg.resources.gpus, 1)} GPU(s): "
                          f"parts went to {offloaded}; raise model.resources.gpus or use model.quantization=nf4")
    return model


def load_model(model_cfg: ModelConfig, device: torch.device, revision: str | None = None):
    """(model, tokenizer) in the config's precision and quantization, placed on ``device`` (or over
    the cell's GPUs); the tokenizer has a pad token. ``revision``: the hub commit of a hub model (the
    one prefetch pinned, models.prefetch.pinned_revision; None: the hub's main). Offline
    (HF_HUB_OFFLINE=1) the files come from the hub cache, where prefetch put them."""
    if model_cfg.kind == "tiny":
        from aletheia_hpc.models.tiny import build_tiny_model
        from aletheia_hpc.models.tokenizer import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = build_tiny_model(model_cfg.family, model_cfg.num_layers)
        if model_cfg.quantization != "none" or spans_gpus(model_cfg, device):
            # bitsandbytes quantizes and accelerate places while loading: go through a saved copy
            with tempfile.TemporaryDirectory(prefix="aletheia-tiny-") as folder:
                model.save_pretrained(folder)
                model = _from_pretrained(folder, model_cfg, device)
            # like a model built from its config, it has no source to look things up in later
            model.name_or_path = model.config.name_or_path = ""
        else:
            model = model.to(device=device, dtype=DTYPES[model_cfg.precision])
    else:
        source = model_directory(model_cfg)
        revision = revision if model_cfg.kind == "hub" else None
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = _from_pretrained(source, model_cfg, device, revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_cfg.num_layers != getattr(model.config, "num_hidden_layers", model_cfg.num_layers):
        raise RuntimeError(f"model {model_cfg.name}: config says num_layers={model_cfg.num_layers} "
                           f"but the loaded model has {model.config.num_hidden_layers}; fix the model config")
    model.config.use_cache = False
    return model, tokenizer


def loaded_revision(model_cfg: ModelConfig, revision: str | None = None) -> str | None:
    """The hub commit a hub model loaded with ``revision`` came from: the snapshot of the hub cache its
    config.json was read from (None for other kinds, or when it is not cached)."""
    if model_cfg.kind != "hub":
        return None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model_cfg.path, "config.json", revision=revision or "main")
    return Path(path).parent.name if isinstance(path, str) else None
