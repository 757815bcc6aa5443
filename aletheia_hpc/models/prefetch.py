"""What a campaign's cells read, fetched before any job runs: ``aletheia-hpc prefetch``.

Compute nodes of most sites cannot reach the internet. Prefetch runs where they can (the login node,
or one job on ``cluster.transfer_partition``) and puts into the cluster's hub cache (``cluster.hf_home``)
everything the cells will read: each hub model's config, tokenizer and weights at one pinned commit,
hub data sets, and the evaluation data the cells ask the hub for. It verifies every file against the
hub's own hashes (SHA-256 of LFS files, the git blob id of the others) and writes a manifest per
campaign part, ``<results>/<part>/inputs/manifest.json``::

    {"format": 1, "hf_home": ..., "inputs": {"model:Qwen/Qwen2.5-3B": {"kind": "hub_model",
     "repo": ..., "requested_revision": "main", "revision": "<commit>", "bytes": ...,
     "files": [{"path": "config.json", "size": ..., "sha256": ...}, ...]}, ...}}

The manifest pins the revision: a later prefetch keeps it (and fetches nothing that is there), and
every cell of the model loads that commit (``pinned_revision``). An entry is written only once all
its files are verified, so a download that broke off is never taken for a complete one; the hub
client resumes a connection that drops mid-file (HTTP Range), and a prefetch that was killed starts
again at the first file it had not finished.

The cache layout is huggingface_hub's (``<hf_home>/hub/models--org--name/snapshots/<commit>/<file>``),
so the jobs' ``from_pretrained`` finds the files with ``HF_HUB_OFFLINE=1``. This module imports
neither torch nor the hub client at import time: plan-time checks read its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aletheia_hpc.config import CellConfig, ClusterConfig, ConfigError
from aletheia_hpc.files import atomic_write
from aletheia_hpc.provenance import utc_now

MANIFEST_FILE = "inputs/manifest.json"
MANIFEST_FORMAT = 1
# top-level repo files a cell reads: config, generation config, tokenizer files, weights (+ index)
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".tiktoken", ".jinja")
_CHUNK = 8 << 20


# ------------------------------------------------------------------ what the cells read

@dataclass
class Input:
    """One thing some cells read from outside the code: its key (``model:<repo>``, ``dataset:<id>:<config>:
    <split>``, ``path:<file or dir>``, ``package:<name>``, ``eval:<benchmark>:<source>``), what it is, and
    the cells (ids, by part) that need it."""
    key: str
    kind: str  # hub_model | hub_dataset | local_path | gguf_package | eval_files
    what: str  # for messages: "hub model Qwen/Qwen2.5-3B (qwen2.5-3b)"
    repo: str = ""  # hub_model, hub_dataset
    config: str | None = None  # hub_dataset
    split: str = ""  # hub_dataset
    params: str = ""  # hub_model: nominal size, for the disk estimate
    path: str = ""  # local_path; eval_files: data_dir
    benchmark: str = ""  # eval_files
    source: str = ""  # eval_files: local | offline | auto
    cells: dict[str, list[str]] = field(default_factory=dict)  # part -> cell ids

    @property
    def n_cells(self) -> int:
        return sum(len(ids) for ids in self.cells.values())


def _cell_inputs(cell: CellConfig) -> list[Input]:
    from aletheia_hpc.data.builtin import BUILTIN_NAME
    from aletheia_hpc.evaluation.benchmarks import REGISTRY
    from aletheia_hpc.evaluation.data import HUB_IDS

    if cell.noop:  # writes a row without loading anything
        return []
    m, out = cell.model, []
    if m.kind == "hub":
        out.append(Input(f"model:{m.path}", "hub_model", f"hub model {m.path} ({m.name})", repo=m.path, params=m.params))
    elif m.kind == "local":
        out.append(Input(f"path:{m.path}", "local_path", f"local model directory {m.path} ({m.name})", path=m.path))
    elif m.kind == "gguf" and m.path.startswith("package:"):
        name = m.path.removeprefix("package:")
        out.append(Input(f"package:{name}", "gguf_package", f"GGUF package {name} ({m.name})", path=name))
    elif m.kind == "gguf":
        out.append(Input(f"path:{m.path}", "local_path", f"GGUF file {m.path} ({m.name})", path=m.path))
    source = cell.data.source
    if source.startswith("hub:"):
        out.append(Input(f"dataset:{source[4:]}::train", "hub_dataset", f"hub data set {source[4:]} (data.source)",
                         repo=source[4:], split="train"))
    elif source != BUILTIN_NAME:
        out.append(Input(f"path:{source}", "local_path", f"data file {source} (data.source)", path=source))
    e = cell.eval
    for name in e.benchmarks:
        if REGISTRY[name].held_out:  # scores the cell's own held-out records
            continue
        if e.source == "hub":
            repo, config, split = HUB_IDS[name]
            out.append(Input(f"dataset:{repo}:{config or ''}:{split}", "hub_dataset",
                             f"hub data set {repo} ({name} evaluation, eval.source=hub)", repo=repo,
                             config=config, split=split))
        else:
            data_dir = e.data_dir or ""
            out.append(Input(f"eval:{name}:{e.source}:{data_dir}", "eval_files",
                             f"{name} evaluation data (eval.source={e.source}"
                             + (f", eval.data_dir={data_dir})" if data_dir else ")"),
                             benchmark=name, source=e.source, path=data_dir))
    return out


def campaign_inputs(cells: list[CellConfig]) -> list[Input]:
    """Every distinct input of ``cells``, each with the cells that read it (first-seen order)."""
    found: dict[str, Input] = {}
    for cell in cells:
        for item in _cell_inputs(cell):
            entry = found.setdefault(item.key, item)
            ids = entry.cells.setdefault(cell.campaign, [])
            if cell.cell_id not in ids:
                ids.append(cell.cell_id)
    return list(found.values())


# ------------------------------------------------------------------ where the cache is

def expanded(path: str, field_name: str) -> Path:
    """``path`` with ~ and $VARS expanded; a variable that is not set here is an error naming it."""
    out = os.path.expanduser(os.path.expandvars(path))
    if "$" in out:
        raise ConfigError(f"{field_name}={path!r}: {out[out.index('$'):].split('/')[0]} is not set here; set it, "
                          "or give the path without it")
    return Path(out)


def hf_home(cluster: ClusterConfig) -> Path:
    """The HF_HOME the cluster's jobs use: ``cluster.hf_home``, else this environment's (as the hub client
    resolves it)."""
    if cluster.hf_home:
        return expanded(cluster.hf_home, "cluster.hf_home")
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "huggingface"


def hub_cache(cluster: ClusterConfig) -> Path:
    """Where hub repos are cached (``HF_HUB_CACHE`` when set and the profile does not name HF_HOME)."""
    if not cluster.hf_home and os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return hf_home(cluster) / "hub"


def snapshot_dir(cache: Path, repo: str, revision: str, repo_type: str = "model") -> Path:
    return Path(cache) / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots" / revision


# ------------------------------------------------------------------ the manifest

def manifest_path(campaign_dir: Path) -> Path:
    return Path(campaign_dir) / MANIFEST_FILE


def read_manifest(campaign_dir: Path) -> dict:
    """A part's manifest (``{"inputs": {}}`` when prefetch never ran); a broken file is an error naming it."""
    path = manifest_path(campaign_dir)
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "inputs": {}}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("inputs"), dict):
            raise ValueError(f"format {data.get('format')!r}")
    except ValueError as exc:
        raise ConfigError(f"{path} is not a prefetch manifest ({exc}): move it aside and run prefetch again") from None
    return data


def pinned_revision(campaign_dir: Path, repo: str) -> str | None:
    """The commit prefetch pinned for hub model ``repo`` in this campaign part, or None (not prefetched:
    the hub's current ``main``)."""
    entry = read_manifest(campaign_dir)["inputs"].get(f"model:{repo}")
    return entry["revision"] if entry else None


def missing_files(entry: dict, cache: Path) -> list[str]:
    """The files of a manifest entry that are not in ``cache`` at their recorded size (a cheap stat per
    file: the hashes were checked when prefetch wrote the entry)."""
    if entry["kind"] == "hub_model":
        base = snapshot_dir(cache, entry["repo"], entry["revision"])
        files = [(base / f["path"], f["size"]) for f in entry["files"]]
    else:  # hub_dataset: absolute paths of the data set library's cache files
        files = [(Path(f["path"]), f["size"]) for f in entry["files"]]
    out = []
    for path, size in files:
        try:
            if path.stat().st_size != size:
                out.append(f"{path} (size differs)")
        except OSError:
            out.append(str(path))
    return out


# ------------------------------------------------------------------ fetching

def _digests(path: Path) -> tuple[str, str]:
    """(SHA-256, git blob SHA-1) of a file, in one read."""
    sha256, size = hashlib.sha256(), path.stat().st_size
    git = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            git.update(chunk)
    return sha256.hexdigest(), git.hexdigest()


def _verify(path: Path, sibling) -> tuple[str | None, str]:
    """(problem or None, sha256) of a downloaded file against the hub's size and hash of it."""
    size = path.stat().st_size
    sha256, git_sha1 = _digests(path)
    expected_size = sibling.lfs.size if sibling.lfs else sibling.size
    if expected_size is not None and size != expected_size:
        return f"{size} bytes, the hub says {expected_size}", sha256
    if sibling.lfs and sibling.lfs.sha256 != sha256:
        return f"SHA-256 {sha256}, the hub says {sibling.lfs.sha256}", sha256
    if not sibling.lfs and sibling.blob_id and sibling.blob_id != git_sha1:
        return f"git blob {git_sha1}, the hub says {sibling.blob_id}", sha256
    return None, sha256


def model_files(siblings) -> list:
    """The repo files a cell reads: top-level config, tokenizer and weight files (safetensors when the repo
    has them, else PyTorch .bin), not READMEs, other formats' exports or sub-folders."""
    top = [s for s in siblings if "/" not in s.rfilename]
    safetensors = any(s.rfilename.endswith(".safetensors") for s in top)
    return sorted((s for s in top if s.rfilename.endswith(MODEL_FILE_SUFFIXES)
                   or (not safetensors and s.rfilename.startswith("pytorch_model") and s.rfilename.endswith(".bin"))),
                  key=lambda s: s.rfilename)


def _free_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class PrefetchError(RuntimeError):
    """An input could not be fetched or verified; the message names it."""


def fetch_hub_model(item: Input, cache: Path, revision: str, say) -> dict:
    """Fetch (or find cached) and verify the files of one hub model at ``revision``; its manifest entry."""
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(item.repo, revision=revision, files_metadata=True)
    files = model_files(info.siblings or [])
    if not any(s.rfilename == "config.json" for s in files):
        raise PrefetchError(f"{item.what}: the repo has no config.json at {info.sha}; is it a transformers model?")
    base = snapshot_dir(cache, item.repo, info.sha)

    def size_of(s):
        return (s.lfs.size if s.lfs else s.size) or 0

    to_fetch = [s for s in files if not (base / s.rfilename).exists()]
    need = sum(size_of(s) for s in to_fetch)
    free = _free_bytes(cache)
    say(f"{item.what}: revision {info.sha}, {len(files)} files, {human_bytes(sum(size_of(s) for s in files))}; "
        f"{len(to_fetch)} to fetch ({human_bytes(need)}), {human_bytes(free)} free in {cache}")
    if need > free:
        raise PrefetchError(f"{item.what}: needs {human_bytes(need)} but {cache} has {human_bytes(free)} free")
    entries = []
    for s in files:
        # progress per file: the hub client's own bar (tqdm) while it downloads
        path = Path(hf_hub_download(item.repo, s.rfilename, revision=info.sha, cache_dir=cache))
        problem, sha256 = _verify(path.resolve(), s)
        if problem:
            # a corrupt blob would be found again by every later run: remove it so the next one fetches it anew
            blob = path.resolve()
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            raise PrefetchError(f"{item.what}: {s.rfilename} does not verify ({problem}); removed it, run prefetch "
                                "again to fetch it anew")
        entries.append({"path": s.rfilename, "size": path.stat().st_size, "sha256": sha256})
        say(f"  verified {s.rfilename} ({human_bytes(entries[-1]['size'])}, sha256 {sha256[:12]})")
    return {"kind": "hub_model", "repo": item.repo, "requested_revision": revision, "revision": info.sha,
            "bytes": sum(e["size"] for e in entries), "files": entries, "fetched_at": utc_now()}


def fetch_hub_dataset(item: Input, say) -> dict:
    """Load one hub data set split once through the data set library (as a job will load it, from its
    cache, offline); its manifest entry lists the library's cache files."""
    try:
        import datasets
    except ImportError:
        raise PrefetchError(f"{item.what}: needs the 'datasets' package (pip install 'aletheia-hpc[hub]')") from None
    table = datasets.load_dataset(item.repo, item.config, split=item.split)
    entries = []
    for cache_file in table.cache_files:
        path = Path(cache_file["filename"])
        entries.append({"path": str(path), "size": path.stat().st_size, "sha256": _digests(path)[0]})
    if not entries:
        raise PrefetchError(f"{item.what}: the data set library kept no cache files, so a job could not load it "
                            "offline")
    say(f"{item.what}: {len(table)} rows, {len(entries)} cache file(s), {human_bytes(sum(e['size'] for e in entries))}")
    return {"kind": "hub_dataset", "repo": item.repo, "config": item.config, "split": item.split,
            "fingerprint": table._fingerprint, "bytes": sum(e["size"] for e in entries), "files": entries,
            "fetched_at": utc_now()}


def _write_manifests(results_dir: Path, inputs: list[Input], entries: dict[str, dict], home: Path) -> list[Path]:
    """Each part's manifest: its old entries, updated with ``entries`` for the inputs its cells read."""
    written = []
    parts = defaultdict(list)
    for item in inputs:
        for part in item.cells:
            parts[part].append(item.key)
    for part, keys in parts.items():
        manifest = read_manifest(results_dir / part)
        changed = {k: entries[k] for k in keys if k in entries and manifest["inputs"].get(k) != entries[k]}
        if changed:
            manifest["inputs"].update(changed)
            manifest.update(hf_home=str(home), written_at=utc_now())
            atomic_write(manifest_path(results_dir / part), json.dumps(manifest, indent=1, sort_keys=True))
            written.append(manifest_path(results_dir / part))
    return written


def prefetch(cells: list[CellConfig], cluster: ClusterConfig, results_dir: Path, say=None) -> list[Path]:
    """Fetch every hub input of ``cells`` into the cluster's cache, verify it, and write the manifests;
    the manifests written. An input already in a manifest with all its files in the cache is not asked
    for again (its revision stays pinned). Raises PrefetchError naming what failed, after recording
    what did not."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            raise ConfigError(f"prefetch needs the hub but {name} is set in this environment; unset it (prefetch "
                              "runs where the hub is reachable: a login or transfer node)")
    home, results_dir = hf_home(cluster), Path(results_dir)
    # the hub and data set libraries read HF_HOME when first imported: the jobs' cache, before that
    os.environ["HF_HOME"] = str(home)
    os.environ.pop("HF_HUB_CACHE", None)
    cache = home / "hub"
    inputs = campaign_inputs(cells)
    known: dict[str, dict] = {}
    for part in {p for item in inputs for p in item.cells}:
        for key, entry in read_manifest(results_dir / part)["inputs"].items():
            known.setdefault(key, entry)
    entries, failed = {}, []
    hub_inputs = [i for i in inputs if i.kind in ("hub_model", "hub_dataset")]
    say(f"prefetch: {len(hub_inputs)} hub input(s) of {len(cells)} cells into {home}")
    for item in hub_inputs:
        old = known.get(item.key)
        if old and not missing_files(old, cache):
            say(f"{item.what}: already fetched ({old.get('revision') or old.get('fingerprint')}), "
                f"{human_bytes(old['bytes'])}")
            entries[item.key] = old
            continue
        try:
            if item.kind == "hub_model":
                entries[item.key] = fetch_hub_model(item, cache, old["revision"] if old else "main", say)
            else:
                entries[item.key] = fetch_hub_dataset(item, say)
        except Exception as exc:  # noqa: BLE001 - one input's failure must not lose the others' entries
            failed.append(f"{item.what}: {type(exc).__name__}: {exc}")
            say(f"FAILED {failed[-1]}")
        _write_manifests(results_dir, inputs, entries, home)  # what is verified so far survives a later failure
    _write_manifests(results_dir, inputs, entries, home)
    for item in inputs:
        if item.kind not in ("hub_model", "hub_dataset"):
            say(f"{item.what}: not from the hub; plan and launch check it where the jobs will read it")
    if failed:
        raise PrefetchError(f"{len(failed)} input(s) not fetched:\n  " + "\n  ".join(failed))
    return sorted({manifest_path(results_dir / p) for item in hub_inputs for p in item.cells})
