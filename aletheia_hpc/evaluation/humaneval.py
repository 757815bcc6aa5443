"""HumanEval: greedy completion of each prompt, pass@1 by testing it from outside a sandbox.

The model continues the prompt (a signature and docstring). The completion is cut at the first
of :data:`STOP_SEQUENCES` (a new top-level statement). ``prompt + completion`` is loaded in
:mod:`.sandbox`, which then only answers calls of the entry point; the problem's ``check`` runs
in this (the evaluator's) process, beside the prompt's own helper functions (e.g. ``poly``,
``encode_cyclic``), and calls the candidate through the pipe. A problem passes when ``check``
returns. The candidate never sees the tests, so nothing it does to its own interpreter changes
the verdict. pass@1 with greedy decoding is the fraction of problems that pass.
"""

from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from aletheia_hpc.evaluation.benchmarks import BenchmarkContext, BenchmarkResult
from aletheia_hpc.evaluation.data import CodeProblem, load_eval_data
from aletheia_hpc.evaluation.generation import generate_greedy
from aletheia_hpc.evaluation.sandbox import (SandboxLimits, SandboxResult, judge_function,
                                             map_guarded, setup_for)

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def candidate_program(problem: CodeProblem, completion: str) -> str:
    """What runs in the sandbox: the prompt and the model's completion, nothing of the tests."""
    return problem.prompt + completion + "\n"


def trusted_check(problem: CodeProblem):
    """The problem's ``check``, defined in a fresh namespace of this process that also holds the
    prompt's definitions; the entry point's name means the candidate there too (some tests,
    e.g. HumanEval/33, call it by name)."""
    namespace: dict = {"__name__": f"humaneval_check_{problem.entry_point}"}
    try:
        exec(compile(problem.prompt + "    pass\n", f"<{problem.task_id} prompt>", "exec"), namespace)  # noqa: S102
    except Exception:  # noqa: BLE001 - a prompt without helpers to reuse; the test may not need any
        namespace = {"__name__": namespace["__name__"]}
    exec(compile(problem.test, f"<{problem.task_id} test>", "exec"), namespace)  # noqa: S102 - dataset code

    def check(candidate) -> None:
        namespace[problem.entry_point] = candidate
        namespace["check"](candidate)

    return check


def check_one(problem: CodeProblem, completion: str, limits: SandboxLimits) -> SandboxResult:
    return judge_function(candidate_program(problem, completion), problem.entry_point,
                          trusted_check(problem), limits)


def check_completions(problems: Sequence[CodeProblem], completions: Sequence[str], *,
                      timeout_s: float = 10.0, memory_mb: int = 1024, workers: int = 2,
                      progress: bool = True, bwrap: bool = True) -> list[SandboxResult]:
    """Test each completion, ``workers`` sandboxes at a time; one result per problem, in order.
    A run that breaks (even the evaluator's side) fails that problem only. ``bwrap=False``
    passes over bubblewrap for the next backend (``unshare``)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, bwrap=bwrap)
    bar = tqdm(total=len(problems), desc="humaneval exec", unit="prog", disable=not progress,
               dynamic_ncols=True)
    try:
        return map_guarded(lambda pair: check_one(*pair, limits), list(zip(problems, completions)),
                           workers, on_done=lambda _i, _r: bar.update(1),
                           setup=lambda: setup_for(limits))
    finally:
        bar.close()


def isolation_record(results: Sequence[SandboxResult]) -> dict | None:
    """What every run of a batch had: the first run's record, with ``features`` narrowed to those
    all runs show (a run that never reported counts as having none)."""
    from aletheia_hpc.evaluation.sandbox import features_of

    if not results:
        return None
    record = dict(results[0].isolation)
    common = set(features_of(record))
    for result in results[1:]:
        common &= set(features_of(result.isolation))
    record["features"] = [f for f in features_of(record) if f in common]
    record["runs"] = len(results)
    return record


def evaluate(model, tokenizer, problems: Sequence[CodeProblem], *, max_new_tokens: int = 384,
             batch_size: int = 8, device=None, max_length: int = 0, timeout_s: float = 10.0,
             memory_mb: int = 1024, workers: int = 2, progress: bool = True) -> dict:
    """pass@1 over ``problems`` with greedy completions; also returns completions, results and
    the isolation the runs had."""
    completions = generate_greedy(model, tokenizer, [p.prompt for p in problems],
                                  max_new_tokens=max_new_tokens, stop_strings=STOP_SEQUENCES,
                                  batch_size=batch_size, device=device, max_length=max_length,
                                  progress=progress, desc="humaneval")
    results = check_completions(problems, completions, timeout_s=timeout_s, memory_mb=memory_mb,
                                workers=workers, progress=progress)
    passed = [r.passed for r in results]
    return {"pass1": sum(passed) / len(problems) if problems else None, "n": len(problems),
            "completions": completions, "passed": passed, "results": results,
            "isolation": isolation_record(results)}


def run(context: BenchmarkContext) -> BenchmarkResult:
    settings = context.settings
    records, _, source = load_eval_data("humaneval", settings)
    result = evaluate(context.model, context.tokenizer, records,
                      max_new_tokens=settings.humaneval_max_new_tokens,
                      timeout_s=settings.humaneval_timeout_s, memory_mb=settings.humaneval_memory_mb,
                      workers=settings.humaneval_workers, **context.common)
    samples = [{"id": p.task_id, "generation": c, "status": r.status, "correct": r.passed}
               for p, c, r in zip(records, result["completions"], result["results"])]
    return BenchmarkResult(result["pass1"], result["n"], source, samples,
                           fields={"humaneval_sandbox": result["isolation"]})
