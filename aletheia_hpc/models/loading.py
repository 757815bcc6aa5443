"""Loading the model a cell names: hub id, local directory, GGUF file, or a tiny test model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aletheia_hpc.config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(model_cfg: ModelConfig) -> torch.device:
    """cuda when present, else cpu; half precision on a CPU is refused here, not deep in a step."""
    if torch.cuda.is_available():
        if model_cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"model {model_cfg.name}: precision=bf16 but this GPU "
                               f"({torch.cuda.get_device_name()}) lacks bf16; set model.precision=fp16")
        return torch.device("cuda")
    if model_cfg.precision == "fp16":
        raise RuntimeError(f"model {model_cfg.name}: precision=fp16 needs a CUDA GPU; on a CPU set "
                           "model.precision=fp32")
    return torch.device("cpu")


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


def load_model(model_cfg: ModelConfig, device: torch.device):
    """(model, tokenizer) in the config's precision on ``device``; the tokenizer has a pad token."""
    if model_cfg.kind == "tiny":
        from aletheia_hpc.models.tiny import build_tiny_model
        from aletheia_hpc.models.tokenizer import tiny_tokenizer

        model = build_tiny_model(model_cfg.family, model_cfg.num_layers).to(DTYPES[model_cfg.precision])
        tokenizer = tiny_tokenizer()
    else:
        source = model_directory(model_cfg)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[model_cfg.precision])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_cfg.num_layers != getattr(model.config, "num_hidden_layers", model_cfg.num_layers):
        raise RuntimeError(f"model {model_cfg.name}: config says num_layers={model_cfg.num_layers} "
                           f"but the loaded model has {model.config.num_hidden_layers}; fix the model config")
    model.config.use_cache = False
    return model.to(device), tokenizer
