"""HumanEval: greedy completion of each prompt, pass@1 by running the problem's tests in a sandbox.

The model continues the prompt (a signature and docstring). The completion is cut at the first
of :data:`STOP_SEQUENCES` (a new top-level statement), then ``prompt + completion + test +
check(entry_point)`` runs in :mod:`.sandbox`; a problem passes when that program runs to its
end. pass@1 with greedy decoding is the fraction of problems that pass.
"""

from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from aletheia_hpc.evaluation.data import CodeProblem
from aletheia_hpc.evaluation.generation import generate_greedy
from aletheia_hpc.evaluation.sandbox import SandboxLimits, SandboxResult, run_many

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def program_for(problem: CodeProblem, completion: str) -> str:
    """The program whose clean exit means ``completion`` solves ``problem``."""
    return (problem.prompt + completion + "\n\n" + problem.test + "\n\n"
            + f"check({problem.entry_point})\n")


def check_completions(problems: Sequence[CodeProblem], completions: Sequence[str], *,
                      timeout_s: float = 10.0, memory_mb: int = 1024, workers: int = 2,
                      progress: bool = True) -> list[SandboxResult]:
    """Run each problem's tests against its completion, ``workers`` sandboxes at a time."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    bar = tqdm(total=len(problems), desc="humaneval exec", unit="prog", disable=not progress,
               dynamic_ncols=True)
    try:
        return run_many([program_for(p, c) for p, c in zip(problems, completions)], limits,
                        workers=workers, on_done=lambda _i, _r: bar.update(1))
    finally:
        bar.close()


def evaluate(model, tokenizer, problems: Sequence[CodeProblem], *, max_new_tokens: int = 384,
             batch_size: int = 8, device=None, max_length: int = 0, timeout_s: float = 10.0,
             memory_mb: int = 1024, workers: int = 2, progress: bool = True) -> dict:
    """pass@1 over ``problems`` with greedy completions; also returns completions and results."""
    completions = generate_greedy(model, tokenizer, [p.prompt for p in problems],
                                  max_new_tokens=max_new_tokens, stop_strings=STOP_SEQUENCES,
                                  batch_size=batch_size, device=device, max_length=max_length,
                                  progress=progress, desc="humaneval")
    results = check_completions(problems, completions, timeout_s=timeout_s, memory_mb=memory_mb,
                                workers=workers, progress=progress)
    passed = [r.passed for r in results]
    return {"pass1": sum(passed) / len(problems) if problems else None, "n": len(problems),
            "completions": completions, "passed": passed, "results": results}
