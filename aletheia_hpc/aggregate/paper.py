"""The paper's published numbers, and the mapping from the paper's model names to our config names.

The numbers live as CSV/JSON under ``results/paper_reference/`` in the repository (see the README
there); this module only reads them. The repository root is the parent of the ``aletheia_hpc``
package directory. When the folder is missing (e.g. an installed wheel without the repository) the
loader returns an empty reference and the report says so instead of failing.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import aletheia_hpc

PAPER_REFERENCE_DIR = Path(aletheia_hpc.__file__).resolve().parent.parent / "results" / "paper_reference"

# Paper model name -> our config name. Order = the paper's Table 1 order (plus the failed Pythia).
PAPER_TO_CONFIG: dict[str, str] = {
    "Qwen2.5-0.5B": "qwen2.5-0.5b",
    "TinyLlama-1.1B": "tinyllama-1.1b",
    "Qwen2.5-1.5B": "qwen2.5-1.5b",
    "StableLM-2-1.6B": "stablelm-2-1.6b",
    "Qwen2.5-3B": "qwen2.5-3b",
    "Phi-3.5-mini": "phi-3.5-mini",
    "GPT-J-6B": "gpt-j-6b",
    "Qwen2.5-7B": "qwen2.5-7b",
    "Mistral-7B": "mistral-7b",
    "Llama-3.1-8B": "llama-3.1-8b",
    "Qwen2.5-14B": "qwen2.5-14b",
    "Mixtral-8x7B": "mixtral-8x7b",
    "Llama-3.1-70B": "llama-3.1-70b",
    "Qwen2.5-72B": "qwen2.5-72b",
    "Pythia-1.4B": "pythia-1.4b",
}
# Other spellings of the same models seen in the paper's text (the "x" of 8x7B was lost there).
_ALIASES = {"mixtral-87b": "Mixtral-8x7B", "mixtral-8x7b-v0.1": "Mixtral-8x7B"}

_BY_LOWER = {name.lower(): name for name in PAPER_TO_CONFIG}
_CONFIG_TO_PAPER = {cfg: name for name, cfg in PAPER_TO_CONFIG.items()}
PAPER_ORDER = {cfg: i for i, cfg in enumerate(PAPER_TO_CONFIG.values())}


def _canonical_paper_name(name: str) -> str | None:
    key = name.strip().lower()
    return _BY_LOWER.get(key) or _ALIASES.get(key)


def config_name(paper_model: str) -> str | None:
    """Our config name for a paper model name (case-insensitive), or None if the paper has no such model."""
    canonical = _canonical_paper_name(paper_model)
    return PAPER_TO_CONFIG[canonical] if canonical else None


def paper_name(model: str | None) -> str | None:
    """The paper's name for one of our models (config name or paper spelling, any case), or None."""
    if not isinstance(model, str):
        return None
    key = model.strip().lower()
    if key in _CONFIG_TO_PAPER:
        return _CONFIG_TO_PAPER[key]
    # Tolerate a hub-style prefix ("Qwen/Qwen2.5-0.5B") or the paper's own spelling.
    return _canonical_paper_name(re.sub(r"^.*/", "", key))


def reference_key(model: str) -> str:
    """The key of ``model`` in the PaperReference tables (our config name of the paper model)."""
    name = paper_name(model)
    return PAPER_TO_CONFIG[name] if name else str(model).lower()


def model_sort_key(model: str) -> tuple:
    """Sort models in the paper's order first, then any other model by name."""
    name = paper_name(model)
    rank = PAPER_ORDER[PAPER_TO_CONFIG[name]] if name else len(PAPER_ORDER)
    return (rank, str(model))


def _float(text: str) -> float | None:
    text = (text or "").strip()
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class PaperReference:
    """The paper's tables keyed by our config name (values are floats, pct / pp where named so)."""

    directory: Path
    found: bool
    models: dict[str, dict] = field(default_factory=dict)
    speed: dict[str, dict] = field(default_factory=dict)
    mmlu: dict[str, dict] = field(default_factory=dict)
    campaign2_abs: dict[str, dict] = field(default_factory=dict)
    compute_matched: dict[str, dict] = field(default_factory=dict)
    headline: dict = field(default_factory=dict)


def _read_table(path: Path, text_columns: tuple[str, ...] = ()) -> dict[str, dict]:
    table: dict[str, dict] = {}
    with open(path, newline="") as handle:
        for record in csv.DictReader(handle):
            name = record.pop("paper_model")
            cfg = config_name(name) or name.lower()
            values: dict = {"paper_model": name}
            for key, text in record.items():
                values[key] = text if key in text_columns else _float(text)
            table[cfg] = values
    return table


def load_paper_reference(directory: Path | None = None) -> PaperReference:
    """Read ``results/paper_reference`` (or ``directory``); an absent folder gives ``found=False``."""
    directory = Path(directory) if directory is not None else PAPER_REFERENCE_DIR
    if not (directory / "campaign1_speed.csv").is_file():
        return PaperReference(directory=directory, found=False)
    ref = PaperReference(directory=directory, found=True)
    ref.models = _read_table(directory / "models.csv",
                             ("model", "paper_family", "params", "campaigns", "note"))
    ref.speed = _read_table(directory / "campaign1_speed.csv")
    ref.mmlu = _read_table(directory / "campaign1_mmlu.csv")
    ref.campaign2_abs = _read_table(directory / "campaign2_deltas_abs.csv")
    ref.compute_matched = _read_table(directory / "compute_matched.csv", ("downstream",))
    headline = directory / "headline.json"
    if headline.is_file():
        ref.headline = json.loads(headline.read_text())
    return ref


def load_autoresearch_reference(ref_dir: Path | str = PAPER_REFERENCE_DIR) -> dict:
    """Section 3.5's AutoResearch figures (autoresearch.json), or {} when the folder is missing."""
    path = Path(ref_dir) / "autoresearch.json"
    return json.loads(path.read_text()) if path.exists() else {}
