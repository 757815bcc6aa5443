"""An offline tokenizer for tiny test models: a byte-level BPE trained once and cached.

Hub tokenizers are out of reach offline, and tiny random-init models only need a tokenizer that
round-trips any text. Training is deterministic (fixed corpus, fixed vocabulary size), takes about
a second, and the result is cached under the project cache so every later use is a file load.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from aletheia_hpc.data.builtin import builtin_records
from aletheia_hpc.files import atomic_write

TINY_VOCAB_SIZE = 512
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}
_CACHE_NAME = f"tiny-bpe-{TINY_VOCAB_SIZE}-v1.json"


def cache_root() -> Path:
    """Where derived artefacts (tokenizers, converted models) live; ALETHEIA_CACHE overrides."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aletheia-hpc"
    return Path(os.environ.get("ALETHEIA_CACHE", default))


def _corpus() -> list[str]:
    # Instruction data plus digits and code-ish text, so prompts of every benchmark tokenize compactly.
    texts = [" ".join(r.values()) for r in builtin_records(2000, seed=1)]
    texts.append("0123456789 def return if else for while import print ( ) [ ] { } : ; = + - * / ")
    texts.append("Question: Answer: A. B. C. D. The answer is #### ")
    return texts


def _train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The cached byte-level BPE tokenizer (vocabulary TINY_VOCAB_SIZE) with pad/eos/bos set."""
    path = cache_root() / "tokenizers" / _CACHE_NAME
    if not path.exists():
        # concurrent first uses each write a whole file; the last one wins
        atomic_write(path, _train().to_str(), fsync=False)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIAL_TOKENS)
