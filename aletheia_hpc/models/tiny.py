"""Tiny random-init models, one per architecture family, built from transformers Config classes.

They exercise the real modelling code of each family (module names, fused projections, MoE
experts) at a size that trains in seconds on a CPU.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers import (GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, MixtralConfig,
                          Olmo2Config, OlmoConfig, Phi3Config, Qwen2Config, StableLmConfig)

from aletheia_hpc.models.tokenizer import SPECIAL_TOKENS, TINY_VOCAB_SIZE, tiny_tokenizer

_HIDDEN, _HEADS, _INTER, _CONTEXT = 64, 4, 128, 512

# family -> (Config class, family-specific keyword arguments beyond the shared ones)
_TINY_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama": (LlamaConfig, {"num_key_value_heads": 2}),
    "qwen2": (Qwen2Config, {"num_key_value_heads": 2}),
    "mistral": (MistralConfig, {"num_key_value_heads": 2, "sliding_window": None}),
    "phi3": (Phi3Config, {"num_key_value_heads": _HEADS}),
    "stablelm": (StableLmConfig, {"num_key_value_heads": _HEADS}),
    "olmo": (OlmoConfig, {"num_key_value_heads": _HEADS}),
    "olmo2": (Olmo2Config, {"num_key_value_heads": _HEADS}),
    "mixtral": (MixtralConfig, {"num_key_value_heads": 2, "num_local_experts": 4,
                                "num_experts_per_tok": 2, "sliding_window": None}),
    "gpt_neox": (GPTNeoXConfig, {}),
    "gptj": (GPTJConfig, {}),
}
TINY_FAMILIES = tuple(_TINY_CONFIGS)


def tiny_config(family: str, num_layers: int = 4) -> PretrainedConfig:
    """A small Config of ``family`` whose vocabulary matches the offline tokenizer."""
    if family not in _TINY_CONFIGS:
        raise ValueError(f"no tiny config for family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    config_cls, extra = _TINY_CONFIGS[family]
    tokens = tiny_tokenizer()
    ids = {name.replace("_token", "_token_id"): tokens.convert_tokens_to_ids(tok)
           for name, tok in SPECIAL_TOKENS.items() if name != "unk_token"}
    if config_cls is GPTJConfig:  # GPT-J spells its sizes the GPT-2 way
        shared = {"n_embd": _HIDDEN, "n_head": _HEADS, "n_layer": num_layers, "n_inner": _INTER,
                  "n_positions": _CONTEXT, "rotary_dim": _HIDDEN // _HEADS // 2}
    else:
        shared = {"hidden_size": _HIDDEN, "num_attention_heads": _HEADS,
                  "num_hidden_layers": num_layers, "intermediate_size": _INTER,
                  "max_position_embeddings": _CONTEXT}
    return config_cls(vocab_size=TINY_VOCAB_SIZE, tie_word_embeddings=False, **shared, **ids, **extra)


def build_tiny_model(family: str, num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A random-init causal LM of ``family`` in fp32, deterministic for a given seed. The global RNG is
    left as it was: a cell seeds it before loading, and its LoRA initialisation draws from it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config(family, num_layers), dtype=torch.float32)
